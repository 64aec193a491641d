"""MoE token combine: sum each token's expert rows back into one row (SPEC.md §4.5).

The adjoint of :mod:`linghe.utils.gather`. Sums are accumulated in fp32 in increasing expert
order and rounded once, so results are bitwise reproducible. A row id ``>= grad.shape[0]`` is
skipped and reported through the device-side flag that
:func:`linghe.utils.gather.check_row_id_map_errors` reads.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm
from .gather import DTYPE_BYTES, WARPS, error_flag, list_size, row_tiling

# Rows whose loads a warp keeps in flight at once (16- and 8-byte vectors; narrower ones hold
# more vectors per lane, so fewer rows keep the register count in check).
DEPTH_WIDE, DEPTH_NARROW = 4, 2


def _context(ROW_BYTES, DTYPE, E, PROB_BYTES):
    tiling = row_tiling(ROW_BYTES)
    return {**tiling, "LIST": list_size(E), "WARPS": WARPS,
            "DEPTH": DEPTH_WIDE if tiling["VB"] >= 8 else DEPTH_NARROW}


UNPERMUTE = Kernel(
    op="unpermute_with_mask_map",
    template="unpermute.cu.j2",
    entry="linghe_unpermute_with_mask_map",
    params=("ROW_BYTES", "DTYPE", "E", "PROB_BYTES"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64"),
    context=_context,
)


def triton_unpermute_with_mask_map(grad, row_id_map, probs):
    """``output[t] = sum over e with row_id_map[t, e] >= 0 of grad[row_id_map[t, e]]`` (fp32 sum,
    increasing expert order, one rounding to ``grad.dtype``), and ``restore_probs`` [T, E]: zero
    except ``restore_probs[t, e] = probs[row_id_map[t, e]]`` for routed pairs (None if ``probs``
    is None). ``grad`` [R, Hd] floating; ``probs`` None or [R]. Padding rows of ``grad`` are
    never read. Returns ``(output, restore_probs)``.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_unpermute_with_mask_map(grad, row_id_map, probs)
    V.tensor("grad", grad, dtypes=V.FLOATING, ndim=2)
    R, hidden = grad.shape
    if hidden == 0:
        raise ValueError(f"grad.shape[1] (hidden size) must be positive, got shape {tuple(grad.shape)}")
    V.tensor("row_id_map", row_id_map, dtypes=(torch.int32,), ndim=2)
    T, E = row_id_map.shape
    if probs is not None:
        V.tensor("probs", probs, ndim=1)
        if probs.element_size() > 8:
            raise TypeError(f"probs must have elements of at most 8 bytes, got {probs.dtype}")
        V.shape("probs", probs, (R,))
    device = V.devices(grad=grad, row_id_map=row_id_map, probs=probs)

    if E == 0:  # no expert: every token's sum is empty
        out = torch.zeros((T, hidden), dtype=grad.dtype, device=device)
        rp = None if probs is None else torch.empty((T, 0), dtype=probs.dtype, device=device)
        return out, rp
    out = torch.empty((T, hidden), dtype=grad.dtype, device=device)
    rp = None if probs is None else torch.empty((T, E), dtype=probs.dtype, device=device)
    if T == 0:
        return out, rp

    row_bytes = hidden * grad.element_size()
    prob_bytes = probs.element_size() if probs is not None else 0
    grad, row_id_map = V.aligned(grad), V.aligned(row_id_map)
    probs = V.aligned(probs) if probs is not None else None
    launch = UNPERMUTE.launcher(device, row_bytes, V.DTYPE_TAG[grad.dtype], E, prob_bytes)
    flag = error_flag(device)  # after the launcher: a first call under graph capture has raised by now
    chunks = row_tiling(row_bytes)["NCH"]
    launch((V.cdiv(T * chunks, WARPS), 1, 1), (WARPS * 32, 1, 1),
           (grad.data_ptr(), row_id_map.data_ptr(), probs.data_ptr() if probs is not None else 0, out.data_ptr(),
            rp.data_ptr() if rp is not None else 0, flag.data_ptr(), T, R))
    return out, rp


@register_prewarm("unpermute_with_mask_map")
def _prewarm(preset):
    dtype = preset["dtype"]
    for prob_bytes in (0, 4):
        yield UNPERMUTE, dict(ROW_BYTES=preset["hidden"] * DTYPE_BYTES[dtype], DTYPE=dtype,
                              E=preset["num_experts"], PROB_BYTES=prob_bytes)
