"""Batched reductions at the TARGETS.md shape: 32 x [4096, 8192] fp32 (SPEC §7.1, #11 and #12).

The data is randn -> fp8 -> fp32 (SPEC §4.12), so about 0.08% of the elements are exact zeros.
Also the later revisions' workload: 512 tensors of [U(102..1024), 2048] fp32 (no target).
"""
import torch

from benchlib import Case
from linghe.utils.reduce import triton_batch_count_zero as count_zero, triton_batch_sum_with_ord as sum_ord


def _torch_sum_squares(xs):
    """What a user would write without linghe: foreach norms, squared and added."""
    return torch.stack(torch._foreach_norm(xs, 2)).square().sum()


def _torch_count_zero(xs):
    return torch.stack([(x == 0).sum() for x in xs]).sum()


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(4096, 8192, device="cuda", generator=g).to(torch.float8_e4m3fn).float() for _ in range(32)]
    nbytes = sum(x.numel() * x.element_size() for x in xs)  # 4,294,967,296
    rows = torch.randint(102, 1025, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    ys = [torch.randn(r, 2048, device="cuda", generator=g) for r in rows]
    ybytes = sum(y.numel() * y.element_size() for y in ys)
    return [
        Case("reduce", "batch_sum_with_ord ord=2 32x[4096,8192] fp32", lambda: sum_ord(xs, 2), nbytes + 4,
             torch_fn=lambda: _torch_sum_squares(xs), target_us=1088),
        Case("reduce", "batch_count_zero 32x[4096,8192] fp32", lambda: count_zero(xs), nbytes + 8,
             torch_fn=lambda: _torch_count_zero(xs), target_us=1070),
        Case("reduce", "batch_sum_with_ord ord=2 512x[U(102,1024),2048] fp32", lambda: sum_ord(ys, 2), ybytes + 4,
             torch_fn=lambda: _torch_sum_squares(ys)),
        Case("reduce", "batch_count_zero 512x[U(102,1024),2048] fp32", lambda: count_zero(ys), ybytes + 8,
             torch_fn=lambda: _torch_count_zero(ys)),
    ]
