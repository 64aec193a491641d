"""SiLU + FP8 block quantisation at the TARGETS.md / SPEC.md §7 shapes.

Plain: x [8192, 4096] bf16 -> [8192, 2048]. Batched: 32 experts with the Triton-linghe test rule
(M=4096, random.Random(0)) -> R = 134,512 rows, x [R, 2048], weight [R, 1] fp32, int32 counts.
Also, without targets, SPEC.md §4's alternative shapes ([8192, 1024]; 256 experts x 256 rows, 2n = 1024).
round_scale=True, output_mode=2 throughout. Floor bytes follow SPEC.md §7.2 (checked against its numbers).
"""
import random

import torch
import torch.nn.functional as F

from benchlib import Case
from linghe.utils.silu import (triton_batch_weighted_silu_and_block_quant_backward as batch_bwd,
                               triton_batch_weighted_silu_and_block_quant_forward as batch_fwd,
                               triton_silu_and_block_quant_backward as silu_bwd,
                               triton_silu_and_block_quant_forward as silu_fwd)


def _cdiv(a, b):
    return -(-a // b)


def _floor_fwd(m, n):
    return m * 2 * n * 2 + 2 * m * n + (n // 128) * m * 4 + _cdiv(m, 128) * n * 4


def _floor_bwd(m, n):
    return m * n * 2 + m * 2 * n * 2 + 2 * m * 2 * n + (2 * n // 128) * m * 4 + _cdiv(m, 128) * 2 * n * 4


def _floor_batch_fwd(splits, n, count_bytes=4):
    r, tiles = sum(splits), sum(_cdiv(c, 128) for c in splits)
    return r * 2 * n * 2 + r * 4 + len(splits) * count_bytes + 2 * r * n + r * (n // 128) * 4 + tiles * n * 4


def _floor_batch_bwd(splits, n, count_bytes=4):
    r, tiles = sum(splits), sum(_cdiv(c, 128) for c in splits)
    return (r * n * 2 + r * 2 * n * 2 + r * 4 + len(splits) * count_bytes + 2 * r * 2 * n + r * (2 * n // 128) * 4
            + tiles * 2 * n * 4 + r * 4)


def _torch_quant(y):
    """Row-wise and transposed power-of-two-scale quantisation, as eager PyTorch would write it."""
    yb = y.view(y.shape[0], -1, 128)
    s = torch.exp2(torch.ceil(torch.log2((yb.abs().amax(-1) / 448).clamp_min(1e-30))))
    yt = F.pad(y.t(), (0, -y.shape[0] % 128)).contiguous().view(y.shape[1], -1, 128)
    st = torch.exp2(torch.ceil(torch.log2((yt.abs().amax(-1) / 448).clamp_min(1e-30))))
    qt = (yt / st[..., None]).to(torch.float8_e4m3fn).view(y.shape[1], -1)[:, :y.shape[0]]
    return (yb / s[..., None]).to(torch.float8_e4m3fn), s.t().contiguous(), qt.contiguous(), st.t().contiguous()


def _torch_fwd(x, w=None):
    n = x.shape[1] // 2
    y = F.silu(x[:, :n].float()) * x[:, n:].float()
    return y if w is None else y * w.float()


def _torch_bwd(g, x, w=None):
    n = x.shape[1] // 2
    a, b, gf = x[:, :n].float(), x[:, n:].float(), g.float()
    sg = torch.sigmoid(a)
    gw = gf if w is None else gf * w.float()
    dx = torch.cat([gw * b * sg * (1 + a * (1 - sg)), gw * a * sg], 1)
    return dx, (gf * a * sg * b).sum(1, keepdim=True)


def _per_expert(y, splits):
    return [_torch_quant(ye) for ye in torch.split(y, splits) if ye.shape[0]]


def _plain_cases(m, n2, targets):
    n = n2 // 2
    x = (torch.randn(m, n2, device="cuda") * 10).to(torch.bfloat16)
    g = torch.randn(m, n, device="cuda").to(torch.bfloat16)
    shape = f"x[{m},{n2}] bf16"
    return [
        Case("silu", f"silu_and_block_quant_forward {shape}", lambda: silu_fwd(x, round_scale=True),
             _floor_fwd(m, n), torch_fn=lambda: _torch_quant(_torch_fwd(x)), target_us=targets[0]),
        Case("silu", f"silu_and_block_quant_backward {shape}", lambda: silu_bwd(g, x, round_scale=True),
             _floor_bwd(m, n), torch_fn=lambda: _torch_quant(_torch_bwd(g, x)[0]), target_us=targets[1]),
    ]


def _batch_cases(splits, n2, label, targets):
    n, r = n2 // 2, sum(splits)
    x = (torch.randn(r, n2, device="cuda") ** 3 / 10).to(torch.bfloat16)
    g = (torch.randn(r, n, device="cuda") ** 3).to(torch.bfloat16)
    w = torch.randn(r, 1, device="cuda")
    counts = torch.tensor(splits, dtype=torch.int32, device="cuda")
    shape = f"{label} x[{r},{n2}] bf16"
    return [
        Case("silu", f"batch_weighted_silu_and_block_quant_forward {shape}",
             lambda: batch_fwd(x, w, counts, splits, round_scale=True), _floor_batch_fwd(splits, n),
             torch_fn=lambda: _per_expert(_torch_fwd(x, w), splits), target_us=targets[0]),
        Case("silu", f"batch_weighted_silu_and_block_quant_backward {shape}",
             lambda: batch_bwd(g, x, w, counts, splits, round_scale=True), _floor_batch_bwd(splits, n),
             torch_fn=lambda: _per_expert(_torch_bwd(g, x, w)[0], splits), target_us=targets[1]),
    ]


def cases():
    rng = random.Random(0)
    rule = [rng.randint(4096 // 2, 3 * 4096 // 2) // 16 * 16 for _ in range(32)]
    assert sum(rule) == 134_512
    assert _floor_fwd(8192, 2048) == 101_711_872 and _floor_bwd(8192, 2048) == 169_869_312
    assert _floor_batch_fwd(rule, 1024) == 835_634_240 and _floor_batch_bwd(rule, 1024) == 1_395_787_776
    out = _plain_cases(8192, 4096, (31, 52))
    out += _batch_cases(rule, 2048, "32 experts", (255, 425))
    out += _plain_cases(8192, 1024, (None, None))
    out += _batch_cases([256] * 256, 1024, "256 experts", (None, None))
    return out
