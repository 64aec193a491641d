"""Reference of the router GEMM ``FusedFp32GEMM`` (SPEC.md §4.3), in float64."""
import torch
import torch.nn.functional as F


def ref_fp32_gemm_forward(x, w):
    """``logits = x . w^T`` in float64: the fp32 GEMM of the up-cast operands before any rounding."""
    return F.linear(x.double(), w.double())


def ref_fp32_gemm_backward(g, x, w):
    """``(dx, dw)`` in float64 for ``g`` shaped like the logits: ``dx = g . w``, ``dw = g^T . x`` over all tokens."""
    n_experts, dim = w.shape
    gd = g.double()
    dx = gd @ w.double()
    dw = gd.reshape(-1, n_experts).t() @ x.double().reshape(-1, dim)
    return dx, dw


def split_bf16(x, parts=2):
    """The bf16 parts the kernels multiply for an fp32/fp16 operand: p0 = bf16(x), p1 = bf16(x - p0), ...

    Each difference is exact in fp32; two parts hold x to 2^-16 relative (fp16 exactly), three exactly.
    """
    rest = x.float()
    out = []
    for _ in range(parts):
        p = rest.to(torch.bfloat16)
        out.append(p)
        rest = rest - p.float()
    return out
