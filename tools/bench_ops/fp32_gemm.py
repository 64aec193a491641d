"""FusedFp32GEMM (router GEMM) at the TARGETS.md shape: input [2, 4096, 2048] bf16, weight [256, 2048] bf16.

Forward and backward (fp32 grad_output, both gradients) against cuBLAS: a bf16 GEMM with fp32 output
(torch.mm with out_dtype where this torch has it, else the fp32 GEMM of up-cast copies). Extra rows:
the backward with grad_output rounded to bf16 (split=False), and on Hopper the mma.sync kernels.
"""
import torch
import torch.nn.functional as F

from benchlib import Case
from linghe.facade.fp32_linear import fp32_gemm_backward, fp32_gemm_forward

B, S, E, K = 2, 4096, 256, 2048
M = B * S
FWD_FLOOR, BWD_FLOOR = 42_991_616, 77_594_624  # SPEC.md §7.2
DX_FLOOR = M * E * 4 + E * K * 2 + M * K * 2  # grad_output, weight in; d_input out
DW_FLOOR = M * E * 4 + M * K * 2 + E * K * 2  # grad_output, input in; d_weight out
FLOPS = 2 * M * E * K


def _mm_fp32_out():
    """torch.mm(a, b, out_dtype=float32) on bf16 operands if available (cuBLAS bf16 GEMM, fp32 output)."""
    a = torch.randn(8, 8, device="cuda", dtype=torch.bfloat16)
    try:
        out = torch.mm(a, a, out_dtype=torch.float32)
        if out.dtype == torch.float32:
            return lambda x, y: torch.mm(x, y, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        pass
    return None


def cases():
    x = torch.randn(B, S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, S, E, device="cuda") * 1e-3
    x2, g2 = x.view(M, K), g.view(M, E)
    mm = _mm_fp32_out()
    if mm is not None:
        wt = w.t()

        def torch_fwd():
            return mm(x2, wt)

        def torch_bwd():  # grad_output rounded to bf16 first: what cuBLAS's bf16 GEMM can take
            gb = g2.bfloat16()
            return mm(gb, w).bfloat16(), mm(gb.t(), x2).bfloat16()
        label = "torch.mm(bf16, out_dtype=fp32)"
    else:
        def torch_fwd():
            return F.linear(x.float(), w.float())

        def torch_bwd():
            return (g2 @ w.float()).bfloat16(), (g2.t() @ x2.float()).bfloat16()
        label = "fp32 GEMM of up-cast copies"
    tag = f"x[{B},{S},{K}] w[{E},{K}] bf16"
    # flops: the useful 2*M*E*K per GEMM (the hi+lo split does twice that on the tensor cores)
    out = [
        Case("fp32_gemm", f"FusedFp32GEMM forward {tag} (torch: {label})", lambda: fp32_gemm_forward(x, w),
             FWD_FLOOR, torch_fn=torch_fwd, target_us=20, flops=FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, fp32 grad split hi+lo (torch: {label})",
             lambda: fp32_gemm_backward(g, x, w), BWD_FLOOR, torch_fn=torch_bwd, target_us=40, flops=2 * FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, grad rounded to bf16 (split=False)",
             lambda: fp32_gemm_backward(g, x, w, split=False), BWD_FLOOR, torch_fn=torch_bwd, flops=2 * FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, d_input only (split)",
             lambda: fp32_gemm_backward(g, x, w, need_weight_grad=False), DX_FLOOR, flops=FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, d_weight only (split)",
             lambda: fp32_gemm_backward(g, x, w, need_input_grad=False), DW_FLOOR, flops=FLOPS),
    ]
    if torch.cuda.get_device_capability() == (9, 0):  # the sm_80 kernels on Hopper, for comparison
        out += [
            Case("fp32_gemm", f"FusedFp32GEMM forward {tag}, mma.sync kernel", lambda: fp32_gemm_forward(
                x, w, impl="mma"), FWD_FLOOR, flops=FLOPS),
            Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, mma.sync kernels", lambda: fp32_gemm_backward(
                g, x, w, impl="mma"), BWD_FLOOR, flops=2 * FLOPS),
        ]
    return out
