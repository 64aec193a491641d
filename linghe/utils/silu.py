"""SiLU (SwiGLU) fused with FP8 block quantisation, plain and per expert (SPEC.md §4.6-4.9).

One template (templates/silu.cu.j2) serves all four entry points: the plain ops are the
batched ones with a single segment of all rows and no weight. Quantisation is
block_quant.cuh's TileQuant, shared with the RMSNorm op.
"""
from __future__ import annotations

import operator

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm
from ..runtime import sm_count

_ARGS = ("ptr",) * 9 + ("i64", "i64", "i32", "i32", "i32", "i32", "i32")
_WKIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_COUNTS = (torch.int32, torch.int64)
_BYTES = {"bf16": 2, "f16": 2, "f32": 4}
SMEM_LIMIT = 232448       # opt-in shared memory per CTA on sm_90 (227 KiB)
SEGMENT_BYTES = 12        # per expert + 1 in the batched kernels: i64 row start, i32 tile start
# Forward SiLU from the MUFU approximations of e^x and 1/x (silu_helpers.cuh: silu_fast) instead of
# the accurate expf and a correctly rounded reciprocal.
FWD_FAST_SIGMOID = True
# Backward: the same approximations in the sigmoid and derivative factor (silu_sigmoid_grad<true>).
BWD_FAST_SIGMOID = True
# Work order of the persistent CTAs (the kernels' last argument): "auto" (see _strided), True (CTA b
# takes items b, b + grid, ...) or False (a contiguous run of items per CTA).
STRIDED_ITEMS = "auto"
# Deepest cp.async pipeline (a stage is one tile of every input) of the plain and the batched kernels;
# the batched ones also keep room for the segment table of FAST_EXPERTS experts.
MAX_STAGES, MAX_BATCH_STAGES = 2, 2   # 3 (one TileQuant buffer) measured no faster: 35.2 vs 35.4 µs
FAST_EXPERTS = 512        # experts for which the batched kernels keep the double buffer


def _tq_bytes(threads):
    """sizeof(TileQuant<...>::Smem): per-warp column maxima, column scales, transposed codes."""
    return (threads // 32) * 128 * 4 + 128 * 4 + 128 * 128


def _layout(kind, DTYPE, GDTYPE, RPT=None, STAGES=None, TQBUF=None, MIN_BLOCKS=None):
    """Tiling of a kernel kind: the single source of its thread count and shared memory size.

    VEC: 16-byte row slices of 16-bit data, 4 values with any fp32 stream. RPT rows per thread,
    chosen for 512 threads (one CTA of 16 warps per SM: twice the warps of 256 threads, which
    measured 1.4-1.6x faster on an H200: the kernels are bound by the latency of the SiLU math).
    STAGES: the deepest cp.async pipeline (up to MAX_STAGES / MAX_BATCH_STAGES tiles) that fits
    with one TileQuant buffer (and the segment table of FAST_EXPERTS experts). TQBUF: two TileQuant
    buffers where they fit too (one barrier less per tile).
    """
    bwd = kind in ("bwd", "bbwd")
    tags = (DTYPE, GDTYPE) if bwd else (DTYPE,)
    vec = 4 if "f32" in tags else 8
    rpt = RPT or (4 if vec == 8 else 8)       # 512 threads: 16 warps hide the SiLU math's latency
    threads = 128 // rpt * (128 // vec)
    stage = 2 * 128 * 128 * _BYTES[DTYPE] + (128 * 128 * _BYTES[GDTYPE] if bwd else 0)
    reserve = SEGMENT_BYTES * (FAST_EXPERTS + 1) if kind in ("bfwd", "bbwd") else 0
    tq = _tq_bytes(threads)
    deepest = MAX_BATCH_STAGES if kind in ("bfwd", "bbwd") else MAX_STAGES
    stages = STAGES or max(k for k in range(1, deepest + 1) if k == 1 or k * stage + tq + reserve <= SMEM_LIMIT)
    tqbuf = TQBUF or (2 if stages * stage + 2 * tq + reserve <= SMEM_LIMIT else 1)
    return {"VEC": vec, "RPT": rpt, "THREADS": threads, "STAGES": stages, "TQBUF": tqbuf,
            "SHARED_BYTES": stages * stage + tqbuf * tq, "MIN_BLOCKS": MIN_BLOCKS or 1}


def _geometry(kind, DTYPE, GDTYPE):
    """(VEC, THREADS, STAGES, SHARED_BYTES) of a kernel kind."""
    t = _layout(kind, DTYPE, GDTYPE)
    return t["VEC"], t["THREADS"], t["STAGES"], t["SHARED_BYTES"]


def _context(kind, **overrides):
    def context(N, DTYPE, ROUND_SCALE, GDTYPE=None):
        t = _layout(kind, DTYPE, GDTYPE or DTYPE, **overrides)
        tiling = {k: t[k] for k in ("VEC", "RPT", "STAGES", "TQBUF", "SHARED_BYTES", "MIN_BLOCKS")}
        return {"KIND": kind, "GDTYPE": GDTYPE or DTYPE, "FWD_FAST_SIGMOID": FWD_FAST_SIGMOID,
                "BWD_FAST_SIGMOID": BWD_FAST_SIGMOID, **tiling}
    return context


SILU_FWD = Kernel("silu_block_quant_fwd", "silu.cu.j2", "linghe_silu_fwd",
                  ("N", "DTYPE", "ROUND_SCALE"), _ARGS, context=_context("fwd"))
SILU_BWD = Kernel("silu_block_quant_bwd", "silu.cu.j2", "linghe_silu_bwd",
                  ("N", "DTYPE", "GDTYPE", "ROUND_SCALE"), _ARGS, context=_context("bwd"))
BATCH_SILU_FWD = Kernel("batch_silu_block_quant_fwd", "silu.cu.j2", "linghe_batch_silu_fwd",
                        ("N", "DTYPE", "ROUND_SCALE"), _ARGS, context=_context("bfwd"))
BATCH_SILU_BWD = Kernel("batch_silu_block_quant_bwd", "silu.cu.j2", "linghe_batch_silu_bwd",
                        ("N", "DTYPE", "GDTYPE", "ROUND_SCALE"), _ARGS, context=_context("bbwd"))
SILU_DW = Kernel("silu_dw_sum", "silu.cu.j2", "linghe_silu_dw", (), ("ptr", "ptr", "i64", "i32", "i32"),
                 context=lambda: {"KIND": "dw"})

_plans: dict = {}


def _plan(kernel, kind, device, constants, dtype, gdtype, experts=0):
    """(launcher, threads, smem, persistent grid size) per device, specialisation and smem size."""
    key = (kernel.op, device.index, constants, experts)
    plan = _plans.get(key)
    if plan is None:
        _, threads, _, shared = _geometry(kind, dtype, gdtype)
        smem = shared + (SEGMENT_BYTES * (experts + 1) if kind in ("bfwd", "bbwd") else 0)
        if smem > SMEM_LIMIT:
            raise ValueError(f"counts: {experts} experts need {smem} bytes of shared memory with these dtypes, "
                             f"more than the {SMEM_LIMIT} a CTA can have")
        launch = kernel.launcher(device, *constants)
        launch.set_dynamic_smem(smem)
        slots = sm_count(device.index) * max(1, launch.blocks_per_sm(threads, smem))
        plan = _plans[key] = (launch, threads, smem, slots)
    return plan


def _strided(grid, nb, rows, experts):
    """The work order argument: 1 strided, 0 contiguous runs.

    Strided keeps the CTAs on consecutive tiles, so together they stream whole rows of x instead of
    scattered 256-byte pieces: on an H200 the batched ops with 32 experts of ~4200 rows ran 19% faster
    (forward 282 -> 230 µs, backward 523 -> 424) and the plain ones 1-2%. But each step then moves a
    CTA grid / nb row tiles ahead, and every thread walks the segment table to the new tile's expert:
    with 256 experts of 256 rows (~16 experts a step) the walk cost more than the order gained
    (forward 65.5 -> 73 µs). So strided where a step crosses at most two experts on average.
    """
    if STRIDED_ITEMS != "auto":
        return int(bool(STRIDED_ITEMS))
    rows_per_step = grid * 128 / nb
    return int(experts <= 1 or rows_per_step * experts <= 2 * rows)


# ---- validation -------------------------------------------------------------------
def _mode(output_mode):
    if isinstance(output_mode, bool) or output_mode not in (0, 1, 2):
        raise ValueError(f"output_mode must be 0 (row-wise), 1 (transposed) or 2 (both), got {output_mode!r}")


def _halves(x):
    """(rows, n) of x [rows, 2n], with n a positive multiple of 128."""
    rows, width = x.shape
    if width % 2:
        raise ValueError(f"x.shape[1] must be even (x = [gate | up] halves), got {width}")
    if width == 0 or width % 256:
        raise ValueError(f"x.shape[1] (2n) must be a positive multiple of 256 so that each half is a multiple "
                         f"of the 128-element quantisation block, got {width}")
    return rows, width // 2


def _weight(weight, rows):
    V.tensor("weight", weight, dtypes=V.FLOATING, ndim=(1, 2))
    if weight.shape[0] != rows or (weight.dim() == 2 and weight.shape[1] != 1):
        raise ValueError(f"weight must have shape ({rows},) or ({rows}, 1) (one value per row of x), "
                         f"got {tuple(weight.shape)}")


def _counts(counts, splits, rows):
    """Checks counts; with splits, checks it against x on the host (no device access). Returns splits."""
    V.tensor("counts", counts, dtypes=_COUNTS, ndim=1)
    if splits is None:
        return None
    if not isinstance(splits, (list, tuple)):
        raise TypeError(f"splits must be a list of ints (counts.tolist()), got {type(splits).__name__}")
    if not all(type(c) is int for c in splits):
        try:
            splits = [operator.index(c) for c in splits]
        except TypeError:
            raise TypeError("splits must hold ints (counts.tolist())") from None
    if len(splits) != counts.shape[0]:
        raise ValueError(f"splits has {len(splits)} entries but counts has {counts.shape[0]}")
    if splits and min(splits) < 0:
        raise ValueError("splits (the expert counts) must be non-negative")
    if sum(splits) != rows:
        raise ValueError(f"splits (the expert counts) sum to {sum(splits)} but x has {rows} rows")
    return splits


def _read_splits(counts, rows):
    """splits=None: read the counts once from the device (the one documented host sync)."""
    splits = counts.tolist()
    if splits and min(splits) < 0:
        raise ValueError("counts must be non-negative")
    if sum(splits) != rows:
        raise ValueError(f"counts sum to {sum(splits)} but x has {rows} rows")
    return splits


def _tiles(splits):
    return sum((c + 127) >> 7 for c in splits)


# ---- the plain ops (SPEC.md §4.6, §4.7) ------------------------------------------
def triton_silu_and_block_quant_forward(x, out=None, scale=None, round_scale=False, output_mode=2):
    """y = silu(x[:, :n]) * x[:, n:] in fp32, quantised to FP8 in 1x128 and/or 128x1 blocks.

    Returns ``(out [M, n] fp8, scale [n/128, M] fp32, transpose_output [n, M] fp8,
    transpose_scale [cdiv(M,128), n] fp32)``. ``output_mode`` 0 writes only the first pair,
    1 only the transposed pair, 2 both; the others are allocated (or the caller's) but not
    written. Caller buffers ``out`` [M, n] fp8 and ``scale`` [n/128, M] fp32 are written in place.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_silu_and_block_quant_forward(x, out, scale, round_scale, output_mode)
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    _mode(output_mode)
    M, n = _halves(x)
    if out is not None:
        V.output("out", out, (M, n), V.FP8)
    if scale is not None:
        V.output("scale", scale, (n // 128, M), torch.float32)
    device = V.devices(x=x, out=out, scale=scale)

    q = out if out is not None else torch.empty((M, n), dtype=V.FP8, device=device)
    s = scale if scale is not None else torch.empty((n // 128, M), dtype=torch.float32, device=device)
    qt = torch.empty((n, M), dtype=V.FP8, device=device)
    st = torch.empty((V.cdiv(M, 128), n), dtype=torch.float32, device=device)
    if M == 0:
        return q, s, qt, st
    x = V.aligned(x)
    tag = V.DTYPE_TAG[x.dtype]
    launch, threads, smem, slots = _plan(SILU_FWD, "fwd", device, (n, tag, bool(round_scale)), tag, tag)
    items = V.cdiv(M, 128) * (n // 128)
    grid = min(items, slots)
    launch((grid, 1, 1), (threads, 1, 1),
           (x.data_ptr(), 0, 0, 0, q.data_ptr(), s.data_ptr(), qt.data_ptr(), st.data_ptr(), 0, M, items, 1, 0, 4,
            output_mode, _strided(grid, n // 128, M, 1)), smem)
    return q, s, qt, st


def triton_silu_and_block_quant_backward(g, x, round_scale=False):
    """Gradient of the SwiGLU, dx = [da | db] [M, 2n], quantised row-wise and transposed.

    Returns ``(dx [M, 2n] fp8, dx_scale [2n/128, M], transpose_dx [2n, M] fp8,
    transpose_dx_scale [cdiv(M,128), 2n])``; no block mixes the da and db halves.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_silu_and_block_quant_backward(g, x, round_scale)
    V.tensor("g", g, dtypes=V.FLOATING, ndim=2)
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    M, n = _halves(x)
    V.shape("g", g, (M, n))
    device = V.devices(g=g, x=x)

    dx = torch.empty((M, 2 * n), dtype=V.FP8, device=device)
    dxs = torch.empty((2 * n // 128, M), dtype=torch.float32, device=device)
    dxt = torch.empty((2 * n, M), dtype=V.FP8, device=device)
    dxts = torch.empty((V.cdiv(M, 128), 2 * n), dtype=torch.float32, device=device)
    if M == 0:
        return dx, dxs, dxt, dxts
    x, g = V.aligned(x), V.aligned(g)
    xtag, gtag = V.DTYPE_TAG[x.dtype], V.DTYPE_TAG[g.dtype]
    launch, threads, smem, slots = _plan(SILU_BWD, "bwd", device, (n, xtag, gtag, bool(round_scale)), xtag, gtag)
    items = V.cdiv(M, 128) * (n // 128)
    grid = min(items, slots)
    launch((grid, 1, 1), (threads, 1, 1),
           (x.data_ptr(), g.data_ptr(), 0, 0, dx.data_ptr(), dxs.data_ptr(), dxt.data_ptr(), dxts.data_ptr(), 0,
            M, items, 1, 0, 4, 2, _strided(grid, n // 128, M, 1)), smem)
    return dx, dxs, dxt, dxts


# ---- the batched ops (SPEC.md §4.8, §4.9) ------------------------------------------
def triton_batch_weighted_silu_and_block_quant_forward(x, weight, counts, splits=None, out=None, scale=None,
                                                       round_scale=False, output_mode=2):
    """Per expert segment: y = silu(a) * b * weight[row], quantised independently per segment.

    ``x`` [R, 2n] holds the experts' rows back to back (expert e: ``counts[e]`` rows).
    Returns ``(out [R, n] fp8, scale [R*n/128], transpose_output [R*n] fp8,
    transpose_scale [sum_e cdiv(c_e,128)*n])`` in the flat per-expert layouts of SPEC.md §4.8.
    With ``splits`` (== counts.tolist()) there is no host sync (CUDA-graph capturable);
    with ``splits=None`` the counts are read once from the device (one sync), same results.
    ``scale`` may be a caller buffer of R*n/128 fp32 elements (any shape, contiguous).
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_batch_weighted_silu_and_block_quant_forward(x, weight, counts, splits, out, scale,
                                                                          round_scale, output_mode)
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    _mode(output_mode)
    R, n = _halves(x)
    _weight(weight, R)
    splits = _counts(counts, splits, R)
    if out is not None:
        V.output("out", out, (R, n), V.FP8)
    if scale is not None:
        V.tensor("scale", scale, dtypes=(torch.float32,))
        if scale.numel() != R * n // 128 or not scale.is_contiguous():
            raise ValueError(f"scale must be a contiguous fp32 buffer of R*n/128 = {R * n // 128} elements, "
                             f"got shape {tuple(scale.shape)}")
    device = V.devices(x=x, weight=weight, counts=counts, out=out, scale=scale)
    if splits is None:
        splits = _read_splits(counts, R)
    tiles = _tiles(splits)

    q = out if out is not None else torch.empty((R, n), dtype=V.FP8, device=device)
    s = scale if scale is not None else torch.empty((R * n // 128,), dtype=torch.float32, device=device)
    qt = torch.empty((R * n,), dtype=V.FP8, device=device)
    st = torch.empty((tiles * n,), dtype=torch.float32, device=device)
    if R == 0:
        return q, s, qt, st
    x = V.aligned(x)
    w = weight.reshape(-1).contiguous()
    counts = counts.contiguous()
    tag = V.DTYPE_TAG[x.dtype]
    E = counts.shape[0]
    launch, threads, smem, slots = _plan(BATCH_SILU_FWD, "bfwd", device, (n, tag, bool(round_scale)),
                                         tag, tag, E)
    items = tiles * (n // 128)
    grid = min(items, slots)
    launch((grid, 1, 1), (threads, 1, 1),
           (x.data_ptr(), 0, w.data_ptr(), counts.data_ptr(), q.data_ptr(), s.data_ptr(), qt.data_ptr(),
            st.data_ptr(), 0, R, items, E, _WKIND[w.dtype], counts.element_size(), output_mode,
            _strided(grid, n // 128, R, E)), smem)
    return q, s, qt, st


def triton_batch_weighted_silu_and_block_quant_backward(g, x, weight, counts, splits=None, round_scale=False):
    """Backward of the batched op: dx = [g*w*d silu(a)/da * b | g*w*silu(a)] quantised per segment,
    and dw[r] = sum_j g*silu(a)*b (fp32 sum, deterministic).

    Returns ``(dx [R, 2n] fp8, dx_scale [R*2n/128], dw [R, 1] weight.dtype, transpose_dx [R*2n] fp8,
    transpose_dx_scale [sum_e cdiv(c_e,128)*2n])``. ``splits`` as in the forward.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_batch_weighted_silu_and_block_quant_backward(g, x, weight, counts, splits, round_scale)
    V.tensor("g", g, dtypes=V.FLOATING, ndim=2)
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    R, n = _halves(x)
    V.shape("g", g, (R, n))
    _weight(weight, R)
    splits = _counts(counts, splits, R)
    device = V.devices(g=g, x=x, weight=weight, counts=counts)
    if splits is None:
        splits = _read_splits(counts, R)
    tiles = _tiles(splits)

    dx = torch.empty((R, 2 * n), dtype=V.FP8, device=device)
    dxs = torch.empty((R * 2 * n // 128,), dtype=torch.float32, device=device)
    dw = torch.empty((R, 1), dtype=weight.dtype, device=device)
    dxt = torch.empty((R * 2 * n,), dtype=V.FP8, device=device)
    dxts = torch.empty((tiles * 2 * n,), dtype=torch.float32, device=device)
    if R == 0:
        return dx, dxs, dw, dxt, dxts
    x, g = V.aligned(x), V.aligned(g)
    w = weight.reshape(-1).contiguous()
    counts = counts.contiguous()
    xtag, gtag = V.DTYPE_TAG[x.dtype], V.DTYPE_TAG[g.dtype]
    E = counts.shape[0]
    launch, threads, smem, slots = _plan(BATCH_SILU_BWD, "bbwd", device, (n, xtag, gtag, bool(round_scale)),
                                         xtag, gtag, E)
    partial = torch.empty((n // 128, R), dtype=torch.float32, device=device)  # dw per column tile
    items = tiles * (n // 128)
    grid = min(items, slots)
    launch((grid, 1, 1), (threads, 1, 1),
           (x.data_ptr(), g.data_ptr(), w.data_ptr(), counts.data_ptr(), dx.data_ptr(), dxs.data_ptr(),
            dxt.data_ptr(), dxts.data_ptr(), partial.data_ptr(), R, items, E, _WKIND[w.dtype],
            counts.element_size(), 2, _strided(grid, n // 128, R, E)), smem)
    SILU_DW.launcher(device)((V.cdiv(R, 256), 1, 1), (256, 1, 1),
                             (partial.data_ptr(), dw.data_ptr(), R, n // 128, _WKIND[dw.dtype]), pdl=True)
    return dx, dxs, dw, dxt, dxts


@register_prewarm("silu")
def _prewarm(preset):
    """Shared-expert SwiGLU (plain ops) at n = ffn; routed experts (batched ops) at n = moe_ffn."""
    dtype = preset["dtype"]
    for round_scale in (False, True):  # output_mode is a kernel argument, not a specialisation
        yield SILU_FWD, dict(N=preset["ffn"], DTYPE=dtype, ROUND_SCALE=round_scale)
        yield BATCH_SILU_FWD, dict(N=preset["moe_ffn"], DTYPE=dtype, ROUND_SCALE=round_scale)
        yield SILU_BWD, dict(N=preset["ffn"], DTYPE=dtype, GDTYPE=dtype, ROUND_SCALE=round_scale)
        yield BATCH_SILU_BWD, dict(N=preset["moe_ffn"], DTYPE=dtype, GDTYPE=dtype, ROUND_SCALE=round_scale)
    yield SILU_DW, {}
