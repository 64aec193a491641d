"""References of SiLU (SwiGLU) + FP8 block quantisation, plain and per expert (SPEC.md §4.6-4.9).

The value that is quantised is computed in float64 and rounded once to float32 (SPEC.md §3.2).
"""
import torch
import torch.nn.functional as F

from .quant import quant_cols, quant_rows


def silu_value(x, weight=None):
    """y = silu(a) * b (* weight per row) for x = [a | b], float32 [M, n] (the pre-quantisation value)."""
    n = x.shape[1] // 2
    a, b = x.double()[:, :n], x.double()[:, n:]
    y = F.silu(a) * b
    if weight is not None:
        y = y * weight.double().reshape(-1, 1)
    return y.float()


def silu_grad_value(g, x, weight=None):
    """dx = [da | db] float32 [M, 2n], and dw = sum_j g * silu(a) * b float64 [M, 1]."""
    n = x.shape[1] // 2
    a, b = x.double()[:, :n], x.double()[:, n:]
    gd, sg = g.double(), torch.sigmoid(a)
    gw = gd if weight is None else gd * weight.double().reshape(-1, 1)
    dx = torch.cat([gw * b * sg * (1 + a * (1 - sg)), gw * a * sg], 1).float()
    dw = (gd * a * sg * b).sum(1, keepdim=True)
    return dx, dw


def ref_silu_fwd(x, round_scale=False):
    """(q [M, n], s [n/128, M], qt [n, M], st [cdiv(M,128), n])."""
    y = silu_value(x)
    return quant_rows(y, round_scale) + quant_cols(y, round_scale)


def ref_silu_bwd(g, x, round_scale=False):
    """(dx [M, 2n], dx_scale [2n/128, M], transpose_dx [2n, M], transpose_dx_scale [cdiv(M,128), 2n])."""
    dx, _ = silu_grad_value(g, x)
    return quant_rows(dx, round_scale) + quant_cols(dx, round_scale)


def _per_expert(y, splits, round_scale):
    """Quantise each expert's row slice of y independently -> flat q, s, qt, st (SPEC.md §4.8 layout)."""
    parts, r = [[], [], [], []], 0
    for c in splits:
        ye, r = y[r:r + c], r + c
        if c == 0:
            continue
        q, s = quant_rows(ye, round_scale)
        qt, st = quant_cols(ye, round_scale)
        for lst, t in zip(parts, (q, s.reshape(-1), qt.reshape(-1), st.reshape(-1))):
            lst.append(t)
    if not parts[0]:  # no rows at all: the empty shapes
        n = y.shape[1]
        return (torch.empty((0, n), dtype=torch.float8_e4m3fn, device=y.device),
                torch.empty((0,), dtype=torch.float32, device=y.device),
                torch.empty((0,), dtype=torch.float8_e4m3fn, device=y.device),
                torch.empty((0,), dtype=torch.float32, device=y.device))
    return [torch.cat(p) for p in parts]


def ref_batch_silu_fwd(x, weight, splits, round_scale=False):
    """(q [R, n], s [R*n/128], qt [R*n], st [sum cdiv(c_e,128)*n]) per expert segment."""
    return _per_expert(silu_value(x, weight), splits, round_scale)


def ref_batch_silu_bwd(g, x, weight, splits, round_scale=False):
    """(dx, dx_scale, dw [R, 1] in weight.dtype, transpose_dx, transpose_dx_scale) per expert segment."""
    dx, dw = silu_grad_value(g, x, weight)
    q, s, qt, st = _per_expert(dx, splits, round_scale)
    return q, s, dw.to(weight.dtype), qt, st
