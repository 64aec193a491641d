"""RMSNorm fused with FP8 block quantisation (SPEC.md §4.1).

Two kernels, chosen per call from compile-time facts only:
- ``norm_rows.cu.j2``: a row per warp (or CTA), read once into registers: rms and the
  row-wise codes (output_mode 0).
- ``norm.cu.j2``: persistent 128x128-tile kernel with a cp.async double buffer. FUSED
  (output_mode 2 when a CTA's slab fits in shared memory): a thread-block cluster shares
  the row sums of squares, and one read of x gives rms, row-wise and transposed codes.
  Otherwise (mode 1, and the column half of mode 2 for wide rows) rms is given.
"""
from __future__ import annotations

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm
from ..runtime import sm_count

MAX_CLUSTER = 8          # portable thread-block cluster size on sm_90
SLAB_LIMIT = 64 * 1024   # a fused CTA's slab: two of them (the double buffer) fit in shared memory
WSMEM_LIMIT = 16 * 1024  # the row kernel stages weights of at most this many bytes in shared memory
_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _rows_tiling(N, DTYPE, WDTYPE, ROUND_SCALE):
    """Register tiling of the row kernel. Its rows are independent (no barrier per row when a warp
    holds a row), so occupancy (MIN_BLOCKS) and the register prefetch of the next row trade
    against each other; WSMEM stages the weights in shared memory when they fit."""
    epv = 16 // _BYTES[DTYPE]
    lanes = 128 // epv                       # threads per 128-column block
    blocks = N // 128
    wsmem = N * _BYTES[WDTYPE] <= WSMEM_LIMIT
    for d in _divisors(blocks):
        tpr, vpt = lanes * d, blocks // d
        if vpt > 8:
            continue
        if tpr <= 32:
            return {"TPR": tpr, "VPT": vpt, "THREADS": 256, "LOOP": False, "MIN_BLOCKS": 2, "PREFETCH": True,
                    "WSMEM": wsmem}
        if tpr <= 1024:
            threads = -(-tpr // 32) * 32
            return {"TPR": tpr, "VPT": vpt, "THREADS": threads, "LOOP": False, "MIN_BLOCKS": max(1, 768 // threads),
                    "PREFETCH": True, "WSMEM": wsmem}
        break
    vectors = N // epv                        # no register tiling: one CTA per row, two passes
    return {"TPR": 512, "VPT": -(-vectors // 512), "THREADS": 512, "LOOP": True, "MIN_BLOCKS": 1,
            "PREFETCH": False, "WSMEM": False}


def _tq_bytes(threads):
    """sizeof(TileQuant<...>::Smem): per-warp column maxima, column scales, transposed codes."""
    return (threads // 32) * 128 * 4 + 128 * 4 + 128 * 128


def _tile_geometry(N, DTYPE, FUSED):
    """(cluster, chunks, slab bytes, threads, stages, TileQuant buffers, dynamic smem bytes, CTAs per SM).

    Both tile kernels double-buffer their slab (cp.async prefetch of the next tile). The fused
    kernel runs one CTA per SM with two TileQuant buffers (one barrier less per 128x128 chunk);
    the column kernel keeps one buffer so that two CTAs fit per SM.
    """
    blocks = N // 128
    cluster = max(d for d in range(1, MAX_CLUSTER + 1) if blocks % d == 0) if FUSED else 1
    chunks = blocks // cluster if FUSED else 1
    slab = chunks * 128 * 128 * _BYTES[DTYPE]
    threads = 512                             # TileQuant with 4 (2-byte x) or 8 (fp32 x) rows per thread
    stages = 2
    tqbuf = 2 if FUSED else 1
    smem = stages * slab + tqbuf * _tq_bytes(threads) + 2 * cluster * 128 * 4 + 128 * 4 + 16
    per_sm = 1 if FUSED or _BYTES[DTYPE] == 4 else 2
    return cluster, chunks, slab, threads, stages, tqbuf, smem, per_sm


def _tiles_context(N, DTYPE, WDTYPE, ROUND_SCALE, FUSED):
    cluster, chunks, _, _, stages, tqbuf, smem, per_sm = _tile_geometry(N, DTYPE, FUSED)
    return {"CLUSTER": cluster, "CHUNKS": chunks, "SMEM_BYTES": smem, "STAGES": stages, "TQBUF": tqbuf,
            "MIN_BLOCKS": per_sm}


def fused_fits(N: int, dtype: str) -> bool:
    """The fused kernel's double-buffered slab (two slabs per CTA) fits in an SM's shared memory."""
    return _tile_geometry(N, dtype, True)[2] <= SLAB_LIMIT


def max_active_clusters(launch, threads, smem, cluster, fallback):
    """Clusters of this kernel the device can hold at once (the persistent grid's size)."""
    if cluster == 1:
        return fallback
    try:
        from cuda.bindings import driver

        from ..runtime import device_context

        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = cluster * fallback, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
        config.sharedMemBytes = smem
        config.numAttrs = 0
        with device_context(launch.device_index):
            err, count = driver.cuOccupancyMaxActiveClusters(launch.function, config)
        if err == driver.CUresult.CUDA_SUCCESS and count > 0:
            return int(count)
    except Exception:  # noqa: BLE001 - an older driver binding: fall back to the CTA count
        pass
    return fallback


NORM_ROWS = Kernel(
    op="rms_norm_rows_quant", template="norm_rows.cu.j2", entry="linghe_rms_norm_rows_quant",
    params=("N", "DTYPE", "WDTYPE", "ROUND_SCALE"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "i64", "f32"), context=_rows_tiling)
NORM_TILES = Kernel(
    op="rms_norm_tiles_quant", template="norm.cu.j2", entry="linghe_rms_norm_tiles_quant",
    params=("N", "DTYPE", "WDTYPE", "ROUND_SCALE", "FUSED"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "f32"), context=_tiles_context)

_plans: dict = {}


def _plan(device, N, dtype, wdtype, output_mode, round_scale):
    """The launches for one specialisation (looked up once per device and constants)."""
    key = (device.index, N, dtype, wdtype, output_mode, round_scale)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    steps = []
    if output_mode == 2 and fused_fits(N, dtype):
        phases = (("tiles", True),)
    else:
        phases = ((("rows", None),) if output_mode != 1 else ()) + ((("tiles", False),) if output_mode != 0 else ())
    for kind, fused in phases:
        if kind == "rows":
            tiling = _rows_tiling(N, dtype, wdtype, round_scale)
            rows_per_cta = 1 if tiling["TPR"] > 32 else tiling["THREADS"] // tiling["TPR"]
            launch = NORM_ROWS.launcher(device, N, dtype, wdtype, round_scale)
            slots = sm_count(device.index) * max(1, launch.blocks_per_sm(tiling["THREADS"], 0))
            steps.append(("rows", launch, tiling["THREADS"], rows_per_cta, slots))
        else:
            cluster, _, _, threads, _, _, smem, _ = _tile_geometry(N, dtype, fused)
            launch = NORM_TILES.launcher(device, N, dtype, wdtype, round_scale, fused)
            launch.set_dynamic_smem(smem)
            slots = sm_count(device.index) * max(1, launch.blocks_per_sm(threads, smem))
            if fused:  # whole clusters: as many as the device holds at once
                slots = cluster * max_active_clusters(launch, threads, smem, cluster, max(1, slots // cluster))
            steps.append(("fused" if fused else "cols", launch, threads, smem, cluster, slots))
    plan = _plans[key] = tuple(steps)
    return plan


def triton_rms_norm_and_block_quant_forward(x, weight, eps=1e-6, out=None, scale=None, rms=None,
                                            round_scale=False, output_mode=2):
    """RMSNorm of ``x`` [M, N] times ``weight`` [N], quantised to FP8 in 1x128 and/or 128x1 blocks.

    Returns ``(out, scale, rms, transpose_output, transpose_scale)`` as SPEC.md §4.1 tabulates:
    ``scale`` is block-major ``[N/128, M]``; a caller's ``scale`` buffer ``[M, N/128]`` receives the
    row-major copy (the Triton-linghe convention). ``rms`` holds ``1/sqrt(mean(x^2)+eps)`` per row and
    is a required input when ``output_mode == 1``. Outputs a mode does not produce are allocated and
    left unwritten (modes 0) or returned as given (mode 1).
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_rms_norm_and_block_quant_forward(x, weight, eps, out, scale, rms, round_scale,
                                                               output_mode)
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    V.tensor("weight", weight, dtypes=V.FLOATING, ndim=1)
    if output_mode not in (0, 1, 2) or isinstance(output_mode, bool):
        raise ValueError(f"output_mode must be 0 (row-wise), 1 (transposed) or 2 (both), got {output_mode!r}")
    M, N = x.shape
    if N % 128 or N == 0:
        raise ValueError(f"x.shape[1] (N) must be a positive multiple of 128, got {N}")
    if weight.shape[0] != N:
        raise ValueError(f"weight must have shape ({N},) to match x, got {tuple(weight.shape)}")
    blocks, mblocks = N // 128, V.cdiv(M, 128)
    if out is not None:
        V.output("out", out, (M, N), V.FP8)
    if scale is not None:
        V.output("scale", scale, (M, blocks), torch.float32)
    if rms is not None:
        V.output("rms", rms, (M,), torch.float32)
    elif output_mode == 1:
        raise ValueError("rms is required when output_mode == 1: pass the reciprocal RMS per row "
                         "(the rms returned by output_mode 0 or 2)")
    device = V.devices(x=x, weight=weight, out=out, scale=scale, rms=rms)
    round_scale = bool(round_scale)

    row_wise = output_mode != 1
    # empty_strided: the cheapest allocation call (torch.empty's argument parsing dominates a
    # small call's host time: 4.8 vs 7.2 µs each, measured on an H200 host).
    empty, f32 = torch.empty_strided, torch.float32
    q = (out if out is not None else empty((M, N), (N, 1), dtype=V.FP8, device=device)) if row_wise else out
    s = empty((blocks, M), (M, 1), dtype=f32, device=device) if row_wise else scale
    r = rms if rms is not None else empty((M,), (1,), dtype=f32, device=device)
    qt = empty((N, M), (M, 1), dtype=V.FP8, device=device)
    st = empty((mblocks, N), (N, 1), dtype=f32, device=device)
    if M == 0:
        return q, s, r, qt, st

    x = V.aligned(x)
    weight = V.aligned(weight)
    eps = float(eps)
    xp, wp, rp, qtp, stp = x.data_ptr(), weight.data_ptr(), r.data_ptr(), qt.data_ptr(), st.data_ptr()
    for step in _plan(device, N, V.DTYPE_TAG[x.dtype], V.DTYPE_TAG[weight.dtype], output_mode, round_scale):
        if step[0] == "rows":
            _, launch, threads, rows_per_cta, slots = step
            launch((min(-(-M // rows_per_cta), slots), 1, 1), (threads, 1, 1),
                   (xp, wp, q.data_ptr(), s.data_ptr(), rp, M, eps))
        else:
            kind, launch, threads, smem, cluster, slots = step
            if kind == "fused":
                grid = min(mblocks, max(1, slots // cluster)) * cluster
                args = (xp, wp, q.data_ptr(), s.data_ptr(), rp, qtp, stp, M, eps)
            else:
                grid = min(mblocks * blocks, slots)
                args = (xp, wp, 0, 0, rp, qtp, stp, M, eps)
            launch((grid, 1, 1), (threads, 1, 1), args, smem)
    if row_wise and scale is not None:
        scale.copy_(s.t())  # the documented quirk: the caller's buffer gets [M, N/128]
    return q, s, r, qt, st


@register_prewarm("rms_norm_block_quant")
def _prewarm(preset):
    dtype = preset["dtype"]
    for n in preset["norm_hidden"]:
        for wdtype in ("bf16", "f32"):
            for round_scale in (False, True):
                yield NORM_ROWS, dict(N=n, DTYPE=dtype, WDTYPE=wdtype, ROUND_SCALE=round_scale)
                yield NORM_TILES, dict(N=n, DTYPE=dtype, WDTYPE=wdtype, ROUND_SCALE=round_scale, FUSED=False)
                if fused_fits(n, dtype):
                    yield NORM_TILES, dict(N=n, DTYPE=dtype, WDTYPE=wdtype, ROUND_SCALE=round_scale, FUSED=True)


# The grouped RMSNorm with sigmoid gate (SPEC.md §4.13) is documented under linghe.utils.norm too.
from .norm_gate import group_norm_gate_backward, group_norm_gate_forward  # noqa: F401,E402
