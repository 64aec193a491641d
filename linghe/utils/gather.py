"""MoE token dispatch: permute token rows to their expert slots (SPEC.md §4.4).

The kernels never write or read outside the tensors they are given. A row id that points outside
them (``>= num_out_tokens`` here, ``>= grad.shape[0]`` in the unpermute) cannot be detected before
the launch without a device->host sync, so it is skipped and recorded in a per-device error flag
on the GPU instead; :func:`check_row_id_map_errors` reads (and clears) that flag, and
:func:`validate_row_id_map` checks a map up front. Both synchronise: call them while debugging,
not on the hot path.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm

WARPS = 4            # warps per CTA; each warp owns one (token, row chunk)
LIST_MAX = 512       # row-map entries compacted per round (per-warp shared-memory list)
LANE_BYTES = 64      # bytes of a row chunk each lane holds in registers
PAD_THREADS = 256    # rows checked per CTA by the padding kernel
INTEGER = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


def pow2_divisor(nbytes: int, cap: int = 16) -> int:
    """The widest power-of-two copy unit (<= cap bytes) that divides ``nbytes``."""
    unit = cap
    while nbytes % unit:
        unit //= 2
    return unit


@lru_cache(maxsize=None)
def row_tiling(row_bytes: int) -> dict:
    """Per-warp chunking of a row: VB-byte vectors, U per lane per chunk, NCH chunks per row.

    Rows whose byte length is not a multiple of 16 use narrower vectors (correct for any size;
    real hidden sizes are multiples of 8 elements and take the 16-byte path)."""
    vb = pow2_divisor(row_bytes)
    nv = row_bytes // vb
    u = max(1, min(LANE_BYTES // vb, V.cdiv(nv, 32)))
    return {"VB": vb, "NV": nv, "U": u, "NCH": V.cdiv(nv, 32 * u)}


def list_size(num_experts: int) -> int:
    return min(LIST_MAX, V.cdiv(num_experts, 32) * 32)


def _permute_context(ROW_BYTES, E, SCALE_BYTES, PROB_BYTES, PADDED):
    return {**row_tiling(ROW_BYTES), "LIST": list_size(E), "WARPS": WARPS,
            "SV": pow2_divisor(SCALE_BYTES) if SCALE_BYTES else 1}


def _pad_context(ROW_BYTES, SCALE_ELEMS, SCALE_ELEM_BYTES, PROB_BYTES):
    tiling = row_tiling(ROW_BYTES)
    return {"VB": tiling["VB"], "NV": tiling["NV"], "THREADS": PAD_THREADS}


PERMUTE = Kernel(
    op="permute_with_mask_map",
    template="permute.cu.j2",
    entry="linghe_permute_with_mask_map",
    params=("ROW_BYTES", "E", "SCALE_BYTES", "PROB_BYTES", "PADDED"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64"),
    context=_permute_context,
)

PERMUTE_PAD = Kernel(
    op="permute_pad_rows",
    template="permute_pad.cu.j2",
    entry="linghe_permute_pad_rows",
    params=("ROW_BYTES", "SCALE_ELEMS", "SCALE_ELEM_BYTES", "PROB_BYTES"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64", "u64"),
    context=_pad_context,
)


# ---- the device-side error flag ------------------------------------------------------------
_ERROR_FLAGS: dict[int, torch.Tensor] = {}
ERR_PERMUTE, ERR_UNPERMUTE = 1, 2


def error_flag(device: torch.device) -> torch.Tensor:
    """The int32 flag the kernels OR bits into when a row id is out of range (one per device)."""
    flag = _ERROR_FLAGS.get(device.index)
    if flag is None:
        flag = _ERROR_FLAGS[device.index] = torch.zeros(1, dtype=torch.int32, device=device)
    return flag


def check_row_id_map_errors(device=None) -> None:
    """Raise ValueError if a permute/unpermute since the last check met an out-of-range row id.

    Synchronises with the device (reads the flag) and clears it. The kernels skip such ids, so the
    outputs of the offending call are incomplete, never corrupted outside their bounds."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    flag = _ERROR_FLAGS.get(device.index)
    if flag is None:
        return
    bits = int(flag.item())
    if bits:
        flag.zero_()
        what = []
        if bits & ERR_PERMUTE:
            what.append("triton_permute_with_mask_map: a row_id_map entry was >= num_out_tokens "
                        "(num_out_tokens is smaller than the largest row id + 1)")
        if bits & ERR_UNPERMUTE:
            what.append("triton_unpermute_with_mask_map: a row_id_map entry was >= grad.shape[0]")
        raise ValueError("; ".join(what) + "; those entries were skipped")


def validate_row_id_map(row_id_map: torch.Tensor, num_out_tokens: int) -> None:
    """Opt-in full check of a map (synchronises): entries are -1 or in [0, num_out_tokens), unique."""
    V.tensor("row_id_map", row_id_map, dtypes=(torch.int32,), ndim=2)
    num_out_tokens = V.integer("num_out_tokens", num_out_tokens)
    routed = row_id_map[row_id_map >= 0]
    if bool((row_id_map < -1).any()):
        raise ValueError("row_id_map entries must be -1 (not routed) or a destination row >= 0")
    if routed.numel():
        largest = int(routed.max())
        if largest >= num_out_tokens:
            raise ValueError(f"num_out_tokens ({num_out_tokens}) must exceed the largest row id in "
                             f"row_id_map ({largest})")
        if routed.unique().numel() != routed.numel():
            raise ValueError("row_id_map destinations must be unique")


# ---- argument checks ----------------------------------------------------------------------
def _check_map(row_id_map, num_tokens: int) -> int:
    V.tensor("row_id_map", row_id_map, dtypes=(torch.int32,), ndim=2)
    if row_id_map.shape[0] != num_tokens:
        raise ValueError(f"row_id_map must have shape ({num_tokens}, num_experts) (one row per token), "
                         f"got {tuple(row_id_map.shape)}")
    return row_id_map.shape[1]


_FILL_BITS: dict = {}


def _fill_bits(dtype: torch.dtype, value: float) -> int:
    """The bit pattern of ``value`` in ``dtype`` (for the padding rows' scale), cached per dtype."""
    key = (dtype, value)
    bits = _FILL_BITS.get(key)
    if bits is None:
        raw = torch.tensor([value], dtype=torch.float64).to(dtype).view(torch.uint8)
        bits = _FILL_BITS[key] = int.from_bytes(bytes(raw.tolist()), "little")
    return bits


def triton_permute_with_mask_map(inp, scale, probs, row_id_map, num_out_tokens, contiguous=True,
                                 tokens_per_expert=None):
    """Copy each token row of ``inp`` [T, Hd] (any dtype, bit-exact) to every expert slot
    ``row_id_map[t, e] >= 0`` of ``output`` [num_out_tokens, Hd]; likewise ``scale`` rows ([T] or
    [T, hs]) and the routing probabilities ``probs[t, e]`` ([T, E]).

    ``contiguous=False`` (a padded map): every output row that no entry targets is written as
    data 0, scale 0 (1e-30 when ``tokens_per_expert`` is given) and prob 0; ``tokens_per_expert``
    [E] is only checked, its values are not needed. ``num_out_tokens=None`` computes the largest
    row id + 1, which synchronises with the device; pass the int on the hot path.

    Returns ``(output, permuted_scale, permuted_probs)``; the last two are None when their input is.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_permute_with_mask_map(inp, scale, probs, row_id_map, num_out_tokens, contiguous,
                                                    tokens_per_expert)
    V.tensor("inp", inp, ndim=2)
    T, hidden = inp.shape
    if hidden == 0:
        raise ValueError(f"inp.shape[1] (hidden size) must be positive, got shape {tuple(inp.shape)}")
    E = _check_map(row_id_map, T)
    if scale is not None:
        V.tensor("scale", scale, ndim=(1, 2))
        if scale.shape[0] != T:
            raise ValueError(f"scale must have shape ({T},) or ({T}, hs) (one row per token), got {tuple(scale.shape)}")
        if scale.element_size() > 8:
            raise TypeError(f"scale must have elements of at most 8 bytes, got {scale.dtype}")
    if probs is not None:
        V.tensor("probs", probs, ndim=2)
        if not probs.is_floating_point() or probs.element_size() > 8:
            raise TypeError(f"probs must be a floating tensor, got dtype {probs.dtype}")
        V.shape("probs", probs, (T, E))
    num_out = None if num_out_tokens is None else V.integer("num_out_tokens", num_out_tokens)
    padded = not contiguous
    if tokens_per_expert is not None:
        V.tensor("tokens_per_expert", tokens_per_expert, dtypes=INTEGER, ndim=1)
        V.shape("tokens_per_expert", tokens_per_expert, (E,))
    device = V.devices(inp=inp, scale=scale, probs=probs, row_id_map=row_id_map,
                       tokens_per_expert=tokens_per_expert)
    if num_out is None:  # documented host sync: the caller did not say how many rows
        num_out = int(row_id_map.max()) + 1 if row_id_map.numel() else 0

    out = torch.empty((num_out, hidden), dtype=inp.dtype, device=device)
    ps = None if scale is None else torch.empty((num_out, *scale.shape[1:]), dtype=scale.dtype, device=device)
    pp = None if probs is None else torch.empty((num_out,), dtype=probs.dtype, device=device)
    copy_rows = T > 0 and E > 0
    fill_pads = padded and num_out > 0
    if not (copy_rows or fill_pads):
        return out, ps, pp

    row_bytes = hidden * inp.element_size()
    scale_elems = 0 if scale is None else (scale.shape[1] if scale.dim() == 2 else 1)
    scale_elem_bytes = scale.element_size() if scale_elems else 0
    prob_bytes = probs.element_size() if probs is not None else 0
    src_of = torch.empty((num_out,), dtype=torch.int64, device=device) if fill_pads else None
    ps_ptr = ps.data_ptr() if scale_elems else 0
    pp_ptr = pp.data_ptr() if probs is not None else 0
    row_id_map = V.aligned(row_id_map)
    if copy_rows:
        inp = V.aligned(inp)
        scale = V.aligned(scale) if scale_elems else None
        probs = V.aligned(probs) if probs is not None else None
        launch = PERMUTE.launcher(device, row_bytes, E, scale_elems * scale_elem_bytes, prob_bytes, padded)
        flag = error_flag(device)  # after the launcher: a first call under graph capture has raised by now
        chunks = row_tiling(row_bytes)["NCH"]
        launch((V.cdiv(T * chunks, WARPS), 1, 1), (WARPS * 32, 1, 1),
               (inp.data_ptr(), scale.data_ptr() if scale is not None else 0,
                probs.data_ptr() if probs is not None else 0, row_id_map.data_ptr(), out.data_ptr(), ps_ptr,
                pp_ptr, src_of.data_ptr() if fill_pads else 0, flag.data_ptr(), T, num_out))
    if fill_pads:
        fill = _fill_bits(scale.dtype, 1e-30 if tokens_per_expert is not None else 0.0) if scale_elems else 0
        launch = PERMUTE_PAD.launcher(device, row_bytes, scale_elems, scale_elem_bytes, prob_bytes)
        launch((V.cdiv(num_out, PAD_THREADS), 1, 1), (PAD_THREADS, 1, 1),
               (out.data_ptr(), ps_ptr, pp_ptr, src_of.data_ptr(), row_id_map.data_ptr(), num_out, T * E, fill))
    return out, ps, pp


def preset_variants(preset):
    """(row_bytes, scale_elems, scale_elem_bytes) of the permutes a preset's training step runs:
    activation rows with no scale or a per-token fp32 scale, and fp8 rows with fp32 block scales."""
    hidden = preset["hidden"]
    act = hidden * DTYPE_BYTES[preset["dtype"]]
    return [(act, 0, 0), (act, 1, 4), (hidden, hidden // 128, 4)]


@register_prewarm("permute_with_mask_map")
def _prewarm(preset):
    E = preset["num_experts"]
    for row_bytes, scale_elems, scale_elem_bytes in preset_variants(preset):
        for prob_bytes in (0, 4):
            for padded in (False, True):
                yield PERMUTE, dict(ROW_BYTES=row_bytes, E=E, SCALE_BYTES=scale_elems * scale_elem_bytes,
                                    PROB_BYTES=prob_bytes, PADDED=padded)
            yield PERMUTE_PAD, dict(ROW_BYTES=row_bytes, SCALE_ELEMS=scale_elems,
                                    SCALE_ELEM_BYTES=scale_elem_bytes, PROB_BYTES=prob_bytes)
