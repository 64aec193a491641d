"""The MoE router GEMM with fp32 logits on 16-bit tensor cores: the kernels and plain functions
behind ``linghe.facade.fp32_linear.FusedFp32GEMM`` (SPEC.md §4.3).

Forward: ``logits = input @ weight.T`` in fp32. bf16 x bf16 products are exact in fp32, so a bf16
tensor-core MMA accumulating in fp32 computes the fp32 GEMM of the up-cast operands with no
up-cast copies and no TF32 rounding. Backward: ``d_input = grad_output @ weight`` and
``d_weight = grad_output.T @ input`` (summed over tokens), both accumulated in fp32.

Operands that are not of the MMA type (fp32, or fp16 next to a bf16 operand) are first split
by a small elementwise kernel into bf16 parts ``p0 = bf16(x)``, ``p1 = bf16(x - p0)``,
``p2 = bf16(x - p0 - p1)``: two parts hold an fp16 value exactly, three an fp32 value exactly.
The GEMM kernel accumulates the part products ``p_i * q_j`` with ``i + j <= 2`` (the rest are
below 2^-24 relative) in one fp32 accumulator ("passes"), so fp32/fp16 operands give the fp32 GEMM
of the up-cast values. The fp32 ``grad_output`` gets two parts (hi + lo: 2^-16 relative, i.e.
fp32-level gradients) at twice the tensor-core work of a plain bf16 GEMM; ``split=False`` rounds
it to bf16 instead (one pass, 2^-8 relative per element: what a bf16 GEMM of the rounded gradient
gives).

Kernels: ``fp32_gemm_wgmma`` (sm_90a: TMA loads into 128B-swizzled shared memory, a producer
warpgroup and mbarrier ring, two consumer warpgroups issuing wgmma; the forward cooperative with
promotion, d_input ping-pong, d_weight split-K; a lane-exchange epilogue storing 16 bytes a lane)
and ``fp32_gemm_mma`` (mma.sync + ldmatrix + cp.async, sm_80 and later, and any row stride). One
template each for the three GEMMs (operand layouts are constants), persistent CTAs, tiles chosen
per specialisation (``tile_config``). With two A parts and one B part (hi.B + lo.B) a stage holds
both A parts and B once. ``d_weight`` reduces over all tokens with a split-K grid whose fp32
partials ``fp32_gemm_reduce`` sums in a fixed order (deterministic). TMA tensor maps are encoded on
the host (``cuTensorMapEncodeTiled``, no device work) and cached per (pointer, shape, box).

Measured on an H200 (median us, L2 flushed, wrapper included; tools/bench.py): forward 20.2
(cuBLAS bf16 GEMM with fp32 output 20.0); backward with the hi + lo split 70.5, split=False 54.0
(cuBLAS bf16 d_input + d_weight of the rounded gradient 87.4).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .. import _validate as V
from .. import runtime
from ..kernel import Kernel, register_prewarm

GEMM_MMA = Kernel(
    op="fp32_gemm_mma",
    template="fp32_gemm.cu.j2",
    entry="linghe_fp32_gemm_mma",
    params=("A_KMAJOR", "B_KMAJOR", "MMA", "OUT", "VEC", "EVEN", "AP", "BM", "BN", "BK", "WM", "WN", "STAGES",
            "PROMO"),
    arg_types=("ptr",) * 7 + ("i32", "i32") + ("i64",) * 8,
)
GEMM_WGMMA = Kernel(
    op="fp32_gemm_wgmma",
    template="fp32_gemm_wgmma.cu.j2",
    entry="linghe_fp32_gemm_wgmma",
    params=("A_KMAJOR", "B_KMAJOR", "MMA", "OUT", "EVEN", "AP", "NWG", "BN", "STAGES", "PROMO", "CLUSTER", "PINGPONG",
            "STV"),
    # tensor maps of A and B (by value), C, npass, pass code, M, N, K, ldc, k_chunk, C's split stride
    arg_types=("struct", "struct", "ptr", "i32", "i32", "i32", "i32", "i32", "i64", "i32", "i64"),
)
SPLIT = Kernel(
    op="fp32_gemm_split",
    template="fp32_gemm_split.cu.j2",
    entry="linghe_fp32_gemm_split",
    params=("IN", "PARTS", "CONTIG"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "i64", "i64", "i64", "i64", "i64"),
)
REDUCE = Kernel(
    op="fp32_gemm_reduce",
    template="fp32_gemm_reduce.cu.j2",
    entry="linghe_fp32_gemm_reduce",
    params=("OUT",),
    arg_types=("ptr", "ptr", "i64", "i32"),
)

# The three GEMMs as C[m, n] = sum_k A[m, k] B[n, k]; (A K-major, B K-major):
#   fwd: logits[tok, e]  = x[tok, :] . w[e, :]          A = x (K-major),   B = w (K-major)
#   dx:  d_x[tok, d]     = sum_e g[tok, e] w[e, d]       A = g (K-major),   B = w (N-major)
#   dw:  d_w[e, d]       = sum_tok g[tok, e] x[tok, d]   A = g (M-major),   B = x (N-major)
LAYOUTS = {"fwd": (True, True), "dx": (True, False), "dw": (False, False)}
IMPLS = ("wgmma", "mma")
_WGMMA_SMEM = 227 * 1024  # dynamic shared memory a CTA may have on sm_90
# FusedFp32GEMM.backward splits an fp32 grad_output into bf16 hi + lo (fp32-level gradients, twice
# the tensor-core work); False rounds it to bf16 (one pass, bf16-level).
SPLIT_GRAD_OUTPUT = True
# Precision. The tensor cores accumulate fp32 with truncation: the error of one accumulation chain
# grows linearly with its length (measured on an H200 at K = 2048 in one chain: 2.1e-6 relative, a plain
# fp32 GEMM 2.5e-7). Chains are kept to at most 2 * CHAIN_K products of k (times the passes): the
# kernels promote their MMA accumulators into fp32 registers every CHAIN_K (forward; d_input when
# E is large: about 5e-7 relative). d_weight's split-K chunks hold at most DW_CHAIN products of k
# (tokens times A parts; about 2e-6), their partials summed in fp32.
CHAIN_K = 512
DW_CHAIN = 2048


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _warps(bm: int, bn: int, max_warps: int = 4) -> tuple[int, int]:
    """Up to max_warps warps over a bm x bn tile, warp tiles of 16..64 rows/columns, as square as possible."""
    wm = wn = 1
    while wm * wn < max_warps:
        if bm // wm >= bn // wn and bm // (2 * wm) >= 16:
            wm *= 2
        elif bn // (2 * wn) >= 16:
            wn *= 2
        elif bm // (2 * wm) >= 16:
            wm *= 2
        else:
            break
    return wm, wn


def _gemm_dims(kind: str, n_experts: int, dim: int) -> tuple:
    """(M, N, K) of a GEMM as far as the model fixes them (None: the token count, known at run time)."""
    return {"fwd": (None, n_experts, dim), "dx": (None, dim, n_experts), "dw": (n_experts, dim, None)}[kind]


@functools.lru_cache(maxsize=None)
def tile_config(impl: str, kind: str, n_experts: int, dim: int, ap: int = 1) -> dict:
    """Tile constants of one GEMM for a model's (n_experts, dim); token counts stay run-time.

    ``ap``: A parts per pipeline stage (2 for the hi + lo split of grad_output against a bf16 operand).
    """
    gm, gn, gk = _gemm_dims(kind, n_experts, dim)
    a_k, b_k = LAYOUTS[kind]
    if impl == "wgmma":
        nwg = 2 if gm is None or gm > 64 else 1
        # The chain of a d_input tile (all of K = n_experts, both parts) is promoted only when long.
        long_chain = kind == "fwd" or (kind == "dx" and gk * ap > 2 * CHAIN_K)
        # d_input's K loop (n_experts) is short: ping-pong consumers (each warpgroup its own 128-row
        # tiles) overlap one's epilogue with the other's MMAs; two accumulator sets: BN <= 128.
        pingpong = kind == "dx" and nwg == 2 and not long_chain and gn > 64
        if b_k:
            bn = _pow2(gn, 16, 128)  # the forward: 8192 tokens x 256 experts is one wave of 128 x 128 tiles
        elif long_chain or pingpong:
            bn = 128 if gn > 64 else 64  # two accumulator sets of 64 x BN per warpgroup
        else:
            # d_weight's wide N (dim) takes 256-wide tiles: half the A traffic per product
            bn = 256 if gn >= 256 else (128 if gn > 64 else 64)
        promo = (CHAIN_K // 64) // ap if long_chain else 0  # k-steps of 64 per promotion chunk
        stage = (nwg * ap * 64 + bn) * 64 * 2
        stages = max(2, min(8, (_WGMMA_SMEM - 1024) // (stage + 16)))
        # Clusters of 2 multicasting A (CLUSTER=2) measured slower on an H200: off.
        return dict(A_KMAJOR=a_k, B_KMAJOR=b_k, AP=ap, NWG=nwg, BN=bn, STAGES=stages, PROMO=promo, CLUSTER=1,
                    PINGPONG=pingpong)
    bm = 128 if gm is None else _pow2(gm, 16, 128)
    bn = _pow2(gn, 16, 128)
    promo = kind == "fwd" or (kind == "dx" and gk * ap > 2 * CHAIN_K)
    wm, wn = _warps(bm, bn, 8 if promo else 4)  # promotion doubles the accumulators: smaller warp tiles
    # <= 99 KiB of shared memory: also fits sm_86/sm_89
    return dict(A_KMAJOR=a_k, B_KMAJOR=b_k, AP=ap, BM=bm, BN=bn, BK=32, WM=wm, WN=wn, STAGES=4 if ap == 1 else 3,
                PROMO=(CHAIN_K // 32) // ap if promo else 0)


def smem_bytes(impl: str, c: dict) -> int:
    if impl == "wgmma":
        stage = (c["NWG"] * c["AP"] * 64 + c["BN"]) * 64 * 2
        return c["STAGES"] * (stage + 16) + 1024  # + barriers, + slack for 1 KiB alignment
    a = (c["BM"] * (c["BK"] + 8)) if c["A_KMAJOR"] else (c["BK"] * (c["BM"] + 8))
    b = (c["BN"] * (c["BK"] + 8)) if c["B_KMAJOR"] else (c["BK"] * (c["BN"] + 8))
    return c["STAGES"] * (c["AP"] * a + b) * 2


def threads(impl: str, c: dict) -> int:
    return 128 * (c["NWG"] + 1) if impl == "wgmma" else 32 * c["WM"] * c["WN"]


def tile_shape(impl: str, c: dict) -> tuple[int, int, int]:
    """(BM, BN, BK) of a configuration."""
    return (64 * c["NWG"], c["BN"], 64) if impl == "wgmma" else (c["BM"], c["BN"], c["BK"])


# ---- device facts (cached per device) ----------------------------------------------
_DEVICE: dict[int, tuple[str, int]] = {}


def _device_info(device: torch.device) -> tuple[str, int]:
    """(default impl, multiprocessor count) of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    info = _DEVICE.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        impl = "wgmma" if (props.major, props.minor) == (9, 0) else "mma"
        info = _DEVICE[index] = (impl, props.multi_processor_count)
    return info


def _impl(device: torch.device, impl) -> str:
    default, _ = _device_info(device)
    if impl is None:
        return default
    if impl not in IMPLS:
        raise ValueError(f"impl must be None, 'wgmma' or 'mma', got {impl!r}")
    if impl == "wgmma" and default != "wgmma":
        raise ValueError("impl='wgmma' needs a Hopper (sm_90) GPU")
    return impl


# ---- TMA tensor maps ---------------------------------------------------------------
class TmaDesc(ctypes.Structure):
    """A CUtensorMap by value (128 opaque bytes) for the kernel's __grid_constant__ parameter."""
    _fields_ = [("words", ctypes.c_uint64 * 16)]


_ENCODE = None
_TMA_CACHE: dict[tuple, TmaDesc] = {}
_TMA_DTYPE = {"bf16": 9, "f16": 6}  # CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 / _FLOAT16


def _encoder():
    """cuTensorMapEncodeTiled of the driver (a host function: no device work, no synchronisation)."""
    global _ENCODE
    if _ENCODE is None:
        fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
        u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _ENCODE = fn
    return _ENCODE


def tma_desc(ptr: int, tag: str, cols: int, rows: int, parts: int, ld: int, part_stride: int, box_rows: int,
             box_parts: int, device_index: int) -> TmaDesc:
    """Tensor map of a [parts][rows][cols] 16-bit tensor (row stride ld, part stride part_stride elements):
    boxes of 64 columns x box_rows rows x box_parts parts, 128-byte swizzle, zeros outside (cached)."""
    key = (ptr, tag, cols, rows, parts, ld, part_stride, box_rows, box_parts)
    desc = _TMA_CACHE.get(key)
    if desc is None:
        if len(_TMA_CACHE) >= 256:
            _TMA_CACHE.clear()
        raw = ctypes.create_string_buffer(128 + 64)  # the encoder wants a 64-byte aligned map
        addr = (ctypes.addressof(raw) + 63) & ~63
        dims = (ctypes.c_uint64 * 3)(cols, rows, parts)
        strides = (ctypes.c_uint64 * 2)(ld * 2, max(part_stride, ld * rows) * 2)
        box = (ctypes.c_uint32 * 3)(64, box_rows, box_parts)
        ones = (ctypes.c_uint32 * 3)(1, 1, 1)
        # interleave none, swizzle 128B, L2 promotion 256B, out-of-bounds fill zeros
        args = (addr, _TMA_DTYPE[tag], 3, ptr, dims, strides, box, ones, 0, 3, 3, 0)
        err = _encoder()(*args)
        if err == 201:  # CUDA_ERROR_INVALID_CONTEXT: a thread (autograd's) where no context is current yet
            with runtime.device_context(device_index):
                err = _encoder()(*args)
        if err != 0:
            raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err} for a [{parts}, {rows}, {cols}] "
                               f"tensor (ld {ld}) at {ptr:#x}")
        desc = TmaDesc()
        ctypes.memmove(ctypes.addressof(desc), addr, 128)
        _TMA_CACHE[key] = desc
    return desc


# ---- operands --------------------------------------------------------------------
def _mma_tag(a_dtype, b_dtype) -> str:
    """f16 tensor cores when both operands are fp16; bf16 otherwise (other operands are split)."""
    return "f16" if a_dtype == b_dtype == torch.float16 else "bf16"


class _Operand:
    """A 2-D GEMM operand as 16-bit parts [part][rows][cols] (row stride ld, part stride pstride elements,
    16-bit dtype tag); ``exact``: the parts sum to it."""

    __slots__ = ("parts", "ld", "exact", "rows", "cols", "pstride", "tag")

    def __init__(self, parts, ld, exact, rows, cols, pstride, tag):
        self.parts, self.ld, self.exact = parts, ld, exact
        self.rows, self.cols, self.pstride, self.tag = rows, cols, pstride, tag

    def desc(self, box_rows: int, box_parts: int) -> TmaDesc:
        t = self.parts[0]
        return tma_desc(t.data_ptr(), self.tag, self.cols, self.rows, len(self.parts), self.ld, self.pstride, box_rows,
                        box_parts, t.device.index)


def _operand(t: torch.Tensor, mma: str, device, max_parts: int = 3, pad: bool = False) -> _Operand:
    """``t`` itself when it has the MMA dtype, else its bf16 parts (all needed for exactness, at most
    max_parts). ``pad``: rows of a multiple of 16 bytes (TMA), copying a 16-bit ``t`` if needed."""
    rows, cols = t.shape
    if V.DTYPE_TAG[t.dtype] == mma:
        t = V.aligned(t)
        if pad and cols % 8:
            ld = -(-cols // 8) * 8
            padded = torch.empty((rows, ld), dtype=t.dtype, device=device)
            padded[:, :cols].copy_(t)
            t = padded
        return _Operand([t], t.shape[1], True, rows, cols, rows * t.shape[1], mma)
    need = 3 if t.dtype == torch.float32 else 2  # fp32: 24 significant bits; fp16: 11
    n = min(need, max_parts)
    ld = -(-cols // 8) * 8  # 16-byte rows for the GEMMs' 16-byte copies
    buf = torch.empty((n, rows, ld), dtype=torch.bfloat16, device=device)
    parts = list(buf.unbind(0))
    if rows:
        s0, s1 = t.stride()
        contig = s1 == 1 and s0 % (16 // t.element_size()) == 0 and t.data_ptr() % 16 == 0
        ptrs = [p.data_ptr() for p in parts] + [0] * (3 - n)
        launch = SPLIT.launcher(device, V.DTYPE_TAG[t.dtype], n, contig)
        launch((V.cdiv(rows * (ld // 8), 256), 1, 1), (256, 1, 1), (t.data_ptr(), *ptrs, rows, cols, s0, s1, ld))
    return _Operand(parts, ld, n == need, rows, cols, rows * ld, "bf16")


def _passes(a: _Operand, b: _Operand) -> tuple[list, int]:
    """Part pairs (i, j) to accumulate, and their code for the kernel (4 bits a pass: i | j << 2)."""
    return _pairs(len(a.parts), a.exact, len(b.parts), b.exact)


@functools.lru_cache(maxsize=None)
def _pairs(na: int, a_exact: bool, nb: int, b_exact: bool) -> tuple[list, int]:
    """Part i is about 2^-8i of the value, so products with i + j > 2 are below fp32 resolution; when
    an operand was cut short (not exact, n parts), terms below its own error 2^-8n are dropped too."""
    limit = 2
    for n, exact in ((na, a_exact), (nb, b_exact)):
        if not exact:
            limit = min(limit, n - 1)
    pairs = [(i, j) for s in range(limit + 1) for i in range(na) for j in range(nb) if i + j == s]
    code = 0
    for p, (i, j) in enumerate(pairs):
        code |= (i | j << 2) << (4 * p)
    return pairs, code


@functools.lru_cache(maxsize=None)
def _schedule(na: int, a_exact: bool, nb: int, b_exact: bool) -> tuple[int, int, int]:
    """(A parts a stage, passes, pass code): hi.B + lo.B runs as one pass with both A parts a stage."""
    pairs, code = _pairs(na, a_exact, nb, b_exact)
    if pairs == [(0, 0), (1, 0)]:
        return 2, 1, 0
    return 1, len(pairs), code


_PLANS: dict[tuple, tuple] = {}


def vector_epilogue(c: dict, out_tag: str, n: int) -> bool:
    """Whether the wgmma epilogue can store 16 bytes a lane (16-byte aligned rows, whole column groups)."""
    if out_tag == "f32":
        return n % 4 == 0 and c["BN"] % 16 == 0
    return n % 8 == 0 and c["BN"] % 32 == 0


def _plan(impl, kind, mma, out_tag, vec, even, ap, n_experts, dim, device, config=None, stv=False):
    """(launcher, config, shared bytes, threads, resident CTAs) of one GEMM specialisation (cached).
    ``config`` overrides tile_config (tuning); ``stv``: the vector epilogue (wgmma)."""
    key = (impl, kind, mma, out_tag, vec, even, ap, n_experts, dim, device.index, stv,
           None if config is None else tuple(sorted(config.items())))
    plan = _PLANS.get(key)
    if plan is None:
        c = dict(tile_config(impl, kind, n_experts, dim, ap))
        c.update(config or {})
        if impl == "wgmma":
            c.setdefault("STV", stv)
            launch = GEMM_WGMMA.launcher(device, c["A_KMAJOR"], c["B_KMAJOR"], mma, out_tag, even, ap, c["NWG"],
                                         c["BN"], c["STAGES"], c["PROMO"], c["CLUSTER"], c["PINGPONG"], c["STV"])
        else:
            launch = GEMM_MMA.launcher(device, c["A_KMAJOR"], c["B_KMAJOR"], mma, out_tag, vec, even, ap, c["BM"],
                                       c["BN"], c["BK"], c["WM"], c["WN"], c["STAGES"], c["PROMO"])
        smem = smem_bytes(impl, c)
        launch.set_dynamic_smem(smem)
        nthreads = threads(impl, c)
        _, sms = _device_info(device)
        resident = sms * max(1, launch.blocks_per_sm(nthreads, smem))
        plan = _PLANS[key] = (launch, c, smem, nthreads, resident)
    return plan


_CALLS: dict[tuple, tuple] = {}  # a GEMM call's launch geometry by everything but its pointers


def _call_geometry(impl, kind, mma, a: _Operand, b: _Operand, M, N, K, n_experts, dim, out_dtype, device, splits,
                   k_chunk, config):
    """(launcher, grid, threads, smem, passes, pass code, A parts a stage, B box rows, k_chunk) of one call:
    computed once per signature (the host path of a repeated call is a dictionary lookup)."""
    key = None if config is not None else (impl, kind, mma, len(a.parts), a.exact, a.ld % 8, len(b.parts), b.exact,
                                           b.ld % 8, out_dtype, M, N, K, n_experts, dim, device.index, splits, k_chunk)
    found = _CALLS.get(key) if key is not None else None
    if found is not None:
        return found
    vec = a.ld % 8 == 0 and b.ld % 8 == 0
    ap, npass, code = _schedule(len(a.parts), a.exact, len(b.parts), b.exact)
    out_tag = V.DTYPE_TAG[out_dtype]
    stv = impl == "wgmma" and vector_epilogue(dict(tile_config(impl, kind, n_experts, dim, ap), **(config or {})),
                                              out_tag, N)
    launch, c, smem, nthreads, resident = _plan(impl, kind, mma, out_tag, vec, N % 2 == 0, ap, n_experts, dim, device,
                                                config, stv)
    bm, bn, bk = tile_shape(impl, c)
    chunk = -(-K // bk) if k_chunk is None else k_chunk
    if impl == "wgmma":
        cl = c["CLUSTER"]
        units = -(-M // bm) * -(-N // (bn * cl))
        # Persistent clusters: at most one resident wave, each walking units x, x + grid, ...
        grid = min(units, max(1, resident // (splits * cl))) * cl
        b_rows = bn if c["B_KMAJOR"] else 64
    else:
        grid = min(-(-M // bm) * -(-N // bn), max(1, resident // splits))
        b_rows = 0
    found = (launch, grid, nthreads, smem, npass, code, ap, b_rows, chunk)
    if key is not None:
        if len(_CALLS) >= 1024:  # token counts vary: keep the table bounded
            _CALLS.clear()
        _CALLS[key] = found
    return found


def _gemm(impl, kind, mma, a: _Operand, b: _Operand, M, N, K, n_experts, dim, out, device, splits=1,
          k_chunk=None, config=None):
    """C[M, N] (out, or fp32 partials [splits, M, N]) = sum over the part pairs of A_i . B_j^T."""
    launch, grid, nthreads, smem, npass, code, ap, b_rows, k_chunk = _call_geometry(
        impl, kind, mma, a, b, M, N, K, n_experts, dim, out.dtype, device, splits, k_chunk, config)
    if impl == "wgmma":
        # pdl: the kernel's set-up overlaps the previous kernel (it waits before touching memory)
        launch((grid, 1, splits), (nthreads, 1, 1),
               (a.desc(64, ap), b.desc(b_rows, 1), out.data_ptr(), npass, code, M, N, K, N, k_chunk, M * N),
               smem=smem, pdl=True)
        return
    pa, pb = a.parts, b.parts
    a0, a1, a2 = (t.data_ptr() for t in (pa + [pa[0]] * 2)[:3])  # unused parts: any valid pointer
    b0, b1, b2 = (t.data_ptr() for t in (pb + [pb[0]] * 2)[:3])
    launch((grid, 1, splits), (nthreads, 1, 1),
           (a0, a1, a2, b0, b1, b2, out.data_ptr(), npass, code, M, N, K, a.ld, b.ld, N, k_chunk, M * N), smem=smem)


@functools.lru_cache(maxsize=1024)
def _dw_splits(impl, n_experts, dim, tokens, ap, sms) -> tuple[int, int]:
    """(splits, k-steps per split) for d_weight: enough CTAs for one wave, and chunks of at most
    DW_CHAIN / ap tokens (one accumulation chain each; the partials are summed in fp32)."""
    c = tile_config(impl, "dw", n_experts, dim, ap)
    bm, bn, bk = tile_shape(impl, c)
    per_sm = 1 if impl == "wgmma" else 2
    tiles = V.cdiv(n_experts, bm) * V.cdiv(dim, bn)
    k_steps = V.cdiv(tokens, bk)
    max_chunk = max(1, DW_CHAIN // (bk * ap))
    splits = max(1, min((sms * per_sm) // tiles, k_steps // 8))
    chunk = min(V.cdiv(k_steps, splits), max_chunk)
    return V.cdiv(k_steps, chunk), chunk


# ---- validation ------------------------------------------------------------------
def _check_operands(input, weight) -> tuple[int, int]:
    V.tensor("input", input, dtypes=V.FLOATING, ndim=(2, 3))
    V.tensor("weight", weight, dtypes=V.FLOATING, ndim=2)
    n_experts, dim = weight.shape
    if input.shape[-1] != dim:
        raise ValueError(f"weight must have shape (n_experts, {input.shape[-1]}) to match input's last dimension, "
                         f"got {tuple(weight.shape)}")
    if dim < 1 or n_experts < 1:
        raise ValueError(f"weight must have n_experts >= 1 and dim >= 1, got shape {tuple(weight.shape)}")
    return n_experts, dim


# ---- the plain functions -----------------------------------------------------------
def fp32_gemm_forward(input: torch.Tensor, weight: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """``input [B, S, K] or [M, K]`` times ``weight [E, K]`` transposed: fp32 logits ``[..., E]``.

    ``input`` and ``weight`` are bf16 (fp16 and fp32 also work and give the fp32 GEMM of the
    up-cast operands). ``impl`` forces a kernel family ('wgmma' on sm_90, or 'mma'); None picks.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.fp32_gemm_forward(input, weight, impl)
    n_experts, dim = _check_operands(input, weight)
    device = V.devices(input=input, weight=weight)
    impl = _impl(device, impl)
    out = torch.empty((*input.shape[:-1], n_experts), dtype=torch.float32, device=device)
    x = input.reshape(-1, dim)
    M = x.shape[0]
    if M == 0:
        return out
    mma = _mma_tag(input.dtype, weight.dtype)
    pad = impl == "wgmma"
    _gemm(impl, "fwd", mma, _operand(x, mma, device, pad=pad), _operand(weight, mma, device, pad=pad), M, n_experts,
          dim, n_experts, dim, out, device)
    return out


def fp32_gemm_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                       need_input_grad: bool = True, need_weight_grad: bool = True, split: bool = True,
                       grad_dtype: torch.dtype | None = None, impl: str | None = None):
    """``(d_input, d_weight)`` of ``logits = input @ weight.T`` for ``grad_output`` shaped like the logits.

    ``d_input = grad_output @ weight`` (shape of ``input``, dtype of ``weight``) and
    ``d_weight = grad_output^T @ input`` over all tokens (``[E, K]``, dtype of ``input``), both
    accumulated in fp32; ``grad_dtype`` overrides both output dtypes (e.g. torch.float32). A gradient
    not needed is not computed and returned as None. ``split=True`` keeps fp32-level accuracy for a
    fp32 ``grad_output`` (bf16 hi + lo parts, two MMA passes, 2^-16 relative); ``split=False``
    rounds it to bf16 (one pass, 2^-8 relative).
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.fp32_gemm_backward(grad_output, input, weight, need_input_grad, need_weight_grad, split,
                                          grad_dtype, impl)
    n_experts, dim = _check_operands(input, weight)
    V.tensor("grad_output", grad_output, dtypes=V.FLOATING)
    V.shape("grad_output", grad_output, (*input.shape[:-1], n_experts))
    if grad_dtype is not None and grad_dtype not in V.FLOATING:
        raise TypeError(f"grad_dtype must be None or one of bfloat16, float16, float32, got {grad_dtype}")
    device = V.devices(grad_output=grad_output, input=input, weight=weight)
    impl = _impl(device, impl)
    M = input.numel() // dim
    dx = dw = None
    if need_input_grad:
        dx = torch.empty(input.shape, dtype=grad_dtype or weight.dtype, device=device)
    if need_weight_grad:
        dw_dtype = grad_dtype or input.dtype
        dw = (torch.zeros if M == 0 else torch.empty)((n_experts, dim), dtype=dw_dtype, device=device)
    if M == 0 or not (need_input_grad or need_weight_grad):
        return dx, dw

    g = grad_output.reshape(M, n_experts)
    g_ops: dict[str, _Operand] = {}  # grad_output's parts, shared by both GEMMs
    pad = impl == "wgmma"  # TMA needs 16-byte rows

    def grad(mma):
        if mma not in g_ops:
            g_ops[mma] = _operand(g, mma, device, max_parts=2 if split else 1, pad=pad)
        return g_ops[mma]

    if need_input_grad:
        mma = _mma_tag(g.dtype, weight.dtype)
        _gemm(impl, "dx", mma, grad(mma), _operand(weight, mma, device, pad=pad), M, dim, n_experts, n_experts, dim,
              dx, device)
    if need_weight_grad:
        x = input.reshape(M, dim)
        mma = _mma_tag(g.dtype, x.dtype)
        ga, xb = grad(mma), _operand(x, mma, device, pad=pad)
        ap = _schedule(len(ga.parts), ga.exact, len(xb.parts), xb.exact)[0]
        splits, chunk = _dw_splits(impl, n_experts, dim, M, ap, _device_info(device)[1])
        if splits == 1:
            _gemm(impl, "dw", mma, ga, xb, n_experts, dim, M, n_experts, dim, dw, device)
        else:
            part = torch.empty((splits, n_experts, dim), dtype=torch.float32, device=device)
            _gemm(impl, "dw", mma, ga, xb, n_experts, dim, M, n_experts, dim, part, device, splits=splits,
                  k_chunk=chunk)
            numel = n_experts * dim
            REDUCE.launcher(device, V.DTYPE_TAG[dw.dtype])((V.cdiv(numel, 1024), 1, 1), (256, 1, 1),
                                                           (part.data_ptr(), dw.data_ptr(), numel, splits), pdl=True)
    return dx, dw


def _gemm_specs(impl, kind, n_experts, dim, mma, out, ap=1):
    c = dict(tile_config(impl, kind, n_experts, dim, ap))
    if impl == "wgmma":
        n = _gemm_dims(kind, n_experts, dim)[1]
        return GEMM_WGMMA, dict(c, MMA=mma, OUT=out, EVEN=True, STV=vector_epilogue(c, out, n))
    return GEMM_MMA, dict(c, MMA=mma, OUT=out, VEC=True, EVEN=True)


@register_prewarm("fp32_gemm")
def _prewarm(preset):
    """The router GEMM of a training step: forward, both gradients of a fp32 grad_output."""
    e, d, act = preset["num_experts"], preset["hidden"], preset["dtype"]
    mma = "f16" if act == "f16" else "bf16"
    for impl in IMPLS:  # the wgmma kernel builds as a stub off sm_90a
        yield _gemm_specs(impl, "fwd", e, d, mma, "f32")
        # the gradients of an fp32 grad_output, split hi + lo: two A parts a stage
        yield _gemm_specs(impl, "dx", e, d, "bf16", act, ap=2)
        yield _gemm_specs(impl, "dw", e, d, "bf16", "f32", ap=2)  # split-K partials
        yield _gemm_specs(impl, "dw", e, d, "bf16", act, ap=2)    # one split (few tokens)
    yield SPLIT, dict(IN="f32", PARTS=2, CONTIG=True)  # grad_output
    if act == "f16":
        yield SPLIT, dict(IN="f16", PARTS=2, CONTIG=True)
    yield REDUCE, dict(OUT=act)
