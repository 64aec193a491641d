"""GroupNormGate (SPEC.md §4.13): grouped RMSNorm of x [B, S, dim] times sigmoid(gate [S, B, dim]).

The output stage of linear attention, written sequence-first ([S, B, dim]). ``group_size`` is the
number of groups G per token (each of d = dim/G contiguous channels), as SPEC.md spells it.

Kernels: a forward (one team of threads per token), a backward (dx, dgate and per-CTA fp32 dweight
partials; one CTA per resident slot, looping over tokens) and a small fixed-order reduction of the
partials into dweight, returned in ``weight.dtype``. No atomics: dweight is bitwise reproducible for
a given device and shape.
"""
from __future__ import annotations

import numbers
from functools import lru_cache

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm

# Tuning: 32-bit words of one tensor a thread holds per pass (its vectors of x, gate, grad), and the
# CTA size aimed at. The forward has one CTA per few tokens. The backward keeps its grid at the GPU's
# resident capacity: one 512-thread CTA per SM with up to 128 registers, so a token's slices stay in
# registers across the reduction while the next tile streams into shared memory (H200: 50.8 µs at the
# TARGETS.md shape, against 52.5 with two CTAs per SM capped at 64 registers).
FWD_WORDS, FWD_CTA = 8, 128   # forward: 128-thread CTAs measured 0.5 µs faster than 256 (H200)
BWD_WORDS, BWD_CTA = 8, 512
BWD_MIN_THREADS = 512   # threads per SM the backward's register budget must allow (__launch_bounds__)
BWD_ONE_PASS = True     # hold a token's slices in registers across the group reduction (else re-read them)
BWD_STAGED = True       # one pass: copy the next tile into shared memory while computing this one
MAX_BWD_SMEM = 200 * 1024   # the backward's dynamic shared memory, all parts
MAX_THREAD_ELEMS = 64   # elements of one tensor a thread holds per pass
MAX_PASSES = 16         # passes over groups per token (unrolled in the kernel)
MAX_ACC_SMEM = 160 * 1024   # the backward's dweight sums in shared memory, T * dim * 4 bytes
_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@lru_cache(maxsize=None)
def geometry(dim: int, groups: int, elem_bytes: int, words: int, cta: int) -> dict:
    """Thread layout of one specialisation (template constants; see norm_gate_fwd.cu.j2).

    VE channels per vector (largest power of two <= 8 dividing d, so every vector is aligned), NV
    vectors per group, TPG threads per group (power of two) with NPT vectors each (about `words`
    32-bit registers per tensor for elements of `elem_bytes`), GS group slots per team (NP passes
    cover G groups), TT = GS*TPG threads per token team, T teams per CTA, THREADS per CTA (T*TT
    rounded up to whole warps), SMEM bytes of the backward's dweight sums.
    """
    d = dim // groups
    ve = 8
    while d % ve:
        ve //= 2
    nv = d // ve
    vec_words = max(1, ve * elem_bytes // 4)
    tpg = min(1024, _pow2_ceil(V.cdiv(nv, max(1, words // vec_words))))
    npt = V.cdiv(nv, tpg)
    gs = min(groups, 1024 // tpg)
    tt = gs * tpg
    teams = max(1, cta // tt)
    return dict(D=d, VE=ve, NV=nv, TPG=tpg, NPT=npt, GS=gs, NP=V.cdiv(groups, gs), TT=tt, T=teams,
                THREADS=V.cdiv(teams * tt, 32) * 32, SMEM=teams * dim * 4)


def _fwd_geometry(dim, groups, *tags):
    return geometry(dim, groups, max(_BYTES[t] for t in tags), FWD_WORDS, FWD_CTA)


def _bwd_geometry(dim, groups, *tags):
    return geometry(dim, groups, max(_BYTES[t] for t in tags), BWD_WORDS, BWD_CTA)


def _fwd_context(DIM, G, XDTYPE, GDTYPE, WDTYPE):
    return _fwd_geometry(DIM, G, XDTYPE, GDTYPE)


@lru_cache(maxsize=None)
def _bwd_context(DIM, G, XDTYPE, GDTYPE, WDTYPE, DDTYPE):
    """The backward's layout plus its launch bound, pass mode and dynamic shared memory (SMEM bytes)."""
    geo = _bwd_geometry(DIM, G, XDTYPE, GDTYPE, DDTYPE)
    elem = max(_BYTES[t] for t in (XDTYPE, GDTYPE, DDTYPE))
    # One pass holds about BWD_WORDS registers per tensor across the reduction and keeps the weights
    # as fp32 in shared memory after the dweight sums.
    one_pass = (BWD_ONE_PASS and geo["NPT"] * geo["VE"] * elem <= 4 * BWD_WORDS
                and geo["SMEM"] + 4 * DIM <= MAX_ACC_SMEM)
    smem = geo["SMEM"] + (4 * DIM if one_pass else 0)
    # Staged: one tile of x, gate and grad slices per thread waits in shared memory (cp.async moves 4,
    # 8 or 16-byte pieces).
    vec_bytes = [geo["VE"] * _BYTES[t] for t in (XDTYPE, GDTYPE, DDTYPE)]
    stage = geo["NPT"] * geo["THREADS"] * sum(vec_bytes)
    staged = (one_pass and BWD_STAGED and geo["NP"] == 1 and min(vec_bytes) >= 4
              and all(b <= 8 or b % 16 == 0 for b in vec_bytes) and smem + 16 + stage <= MAX_BWD_SMEM)
    return dict(geo, MIN_BLOCKS=max(1, BWD_MIN_THREADS // geo["THREADS"]), ONE_PASS=one_pass, STAGED=staged,
                SMEM=smem + (16 + stage if staged else 0))


FWD = Kernel(
    op="group_norm_gate_fwd",
    template="norm_gate_fwd.cu.j2",
    entry="linghe_group_norm_gate_fwd",
    params=("DIM", "G", "XDTYPE", "GDTYPE", "WDTYPE"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "i64", "i64", "f32"),
    context=_fwd_context,
)
BWD = Kernel(
    op="group_norm_gate_bwd",
    template="norm_gate_bwd.cu.j2",
    entry="linghe_group_norm_gate_bwd",
    params=("DIM", "G", "XDTYPE", "GDTYPE", "WDTYPE", "DDTYPE"),
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64", "f32"),
    context=_bwd_context,
)
DW = Kernel(
    op="group_norm_gate_dw",
    template="norm_gate_dw.cu.j2",
    entry="linghe_group_norm_gate_dw",
    params=("ODTYPE",),
    arg_types=("ptr", "ptr", "i64", "i64"),
)


def _check(x, gate, weight, eps, group_size):
    """Types, ranks, dtypes and shapes (no device checks). Returns (S, B, dim, G)."""
    V.tensor("x", x, dtypes=V.FLOATING, ndim=(3, 4))
    V.tensor("gate", gate, dtypes=V.FLOATING, ndim=3)
    V.tensor("weight", weight, dtypes=V.FLOATING, ndim=1)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size (the number of groups per token) must be an int, got {type(group_size).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    group_size = int(group_size)
    S, B, dim = gate.shape
    if dim == 0:
        raise ValueError(f"gate.shape[2] (dim) must be positive, got gate shape {tuple(gate.shape)}")
    if group_size < 1 or dim % group_size:
        raise ValueError(f"group_size (the number of groups) must be a positive divisor of dim={dim}, got {group_size}")
    flat = x.shape[2] * (x.shape[3] if x.dim() == 4 else 1)
    if tuple(x.shape[:2]) != (B, S) or flat != dim:
        raise ValueError(f"x must have shape (B, S, dim) = {(B, S, dim)} or (B, S, heads, head_dim) with "
                         f"heads*head_dim = {dim} (gate is [S, B, dim] = {tuple(gate.shape)}), got {tuple(x.shape)}")
    V.shape("weight", weight, (dim,))
    return S, B, dim, group_size


def _fits(geo: dict, backward: bool) -> bool:
    """Whether a layout stays within the kernels' per-thread registers and shared memory."""
    elems = geo["NPT"] * geo["VE"]
    return (elems <= MAX_THREAD_ELEMS and geo["NP"] <= MAX_PASSES
            and (not backward or (geo["NP"] * elems <= MAX_THREAD_ELEMS and geo["SMEM"] <= MAX_ACC_SMEM)))


def _check_size(dim, G, *geos_backward):
    for geo, backward in geos_backward:
        if not _fits(geo, backward):
            raise ValueError(f"dim={dim} with group_size={G} is beyond the kernels' per-token tiling; "
                             f"dim <= 32768 with group_size <= 16384 is supported")


def _forward(x, gate, weight, eps, group_size):
    """(out, x, gate, weight) with the inputs as the kernel read them (contiguous, aligned)."""
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.group_norm_gate_forward(x, gate, weight, eps, group_size), x, gate, weight
    S, B, dim, G = _check(x, gate, weight, eps, group_size)
    tags = (V.DTYPE_TAG[x.dtype], V.DTYPE_TAG[gate.dtype], V.DTYPE_TAG[weight.dtype])
    geo = _fwd_geometry(dim, G, tags[0], tags[1])
    # The backward's layout too (grad assumed of x's dtype): a shape autograd cannot differentiate
    # fails here, not after the forward ran.
    _check_size(dim, G, (geo, False), (_bwd_geometry(dim, G, tags[0], tags[1], tags[0]), True))
    device = V.devices(x=x, gate=gate, weight=weight)
    out = torch.empty((S, B, dim), dtype=x.dtype, device=device)
    x, gate, weight = V.aligned(x), V.aligned(gate), V.aligned(weight)
    if S * B == 0:
        return out, x, gate, weight
    launch = FWD.launcher(device, dim, G, *tags)
    launch((V.cdiv(S * B, geo["T"]), 1, 1), (geo["THREADS"], 1, 1),
           (x.data_ptr(), gate.data_ptr(), weight.data_ptr(), out.data_ptr(), S, B, float(eps)))
    return out, x, gate, weight


def group_norm_gate_forward(x, gate, weight, eps=1e-6, group_size=4):
    """``out [S, B, dim]`` (x.dtype) = grouped RMSNorm(x [B, S, dim]) * weight * sigmoid(gate [S, B, dim]).

    ``x`` may also be ``[B, S, heads, head_dim]``. ``group_size`` is the number of groups G per token
    (each of dim/G contiguous channels), as SPEC.md §4.13 names it.
    """
    return _forward(x, gate, weight, eps, group_size)[0]


def group_norm_gate_backward(grad, x, gate, weight, eps=1e-6, group_size=4):
    """``(dx, dgate, dweight)`` for ``grad`` [S, B, dim] of :func:`group_norm_gate_forward`'s output.

    ``dx`` has x's shape and dtype, ``dgate`` gate's; ``dweight`` [dim] is summed over all tokens in
    fp32 in a fixed order (bitwise reproducible on one device and shape) and returned in ``weight.dtype``.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.group_norm_gate_backward(grad, x, gate, weight, eps, group_size)
    S, B, dim, G = _check(x, gate, weight, eps, group_size)
    V.tensor("grad", grad, dtypes=V.FLOATING)
    V.shape("grad", grad, (S, B, dim))
    tags = (V.DTYPE_TAG[x.dtype], V.DTYPE_TAG[gate.dtype], V.DTYPE_TAG[weight.dtype], V.DTYPE_TAG[grad.dtype])
    geo = _bwd_geometry(dim, G, tags[0], tags[1], tags[3])
    _check_size(dim, G, (geo, True))
    geo = _bwd_context(dim, G, *tags)
    device = V.devices(grad=grad, x=x, gate=gate, weight=weight)
    dx = torch.empty(x.shape, dtype=x.dtype, device=device)
    dgate = torch.empty((S, B, dim), dtype=gate.dtype, device=device)
    if S * B == 0:
        return dx, dgate, torch.zeros((dim,), dtype=weight.dtype, device=device)
    grad, x, gate, weight = V.aligned(grad), V.aligned(x), V.aligned(gate), V.aligned(weight)
    launch = BWD.launcher(device, dim, G, *tags)
    smem = geo["SMEM"]
    if smem > 40 * 1024:   # beyond the default 48 KiB per CTA with the static part: opt in (cheap after once)
        launch.set_dynamic_smem(smem)
    rows = min(V.cdiv(S * B, geo["T"]), launch.resident_ctas(geo["THREADS"], smem))
    partial = torch.empty((rows, dim), dtype=torch.float32, device=device)
    launch((rows, 1, 1), (geo["THREADS"], 1, 1),
           (grad.data_ptr(), x.data_ptr(), gate.data_ptr(), weight.data_ptr(), dx.data_ptr(), dgate.data_ptr(),
            partial.data_ptr(), S, B, float(eps)), smem=smem)
    dweight = torch.empty((dim,), dtype=weight.dtype, device=device)
    DW.launcher(device, tags[2])((V.cdiv(dim, 32), 1, 1), (32, 32, 1),
                                 (partial.data_ptr(), dweight.data_ptr(), rows, dim), pdl=True)
    return dx, dgate, dweight


@register_prewarm("group_norm_gate")
def _prewarm(preset):
    dim, groups, dtype = preset["hidden"], preset["linear_attn_groups"], preset["dtype"]
    for wdtype in ("bf16", "f32"):
        yield FWD, dict(DIM=dim, G=groups, XDTYPE=dtype, GDTYPE=dtype, WDTYPE=wdtype)
        yield BWD, dict(DIM=dim, G=groups, XDTYPE=dtype, GDTYPE=dtype, WDTYPE=wdtype, DDTYPE=dtype)
        yield DW, dict(ODTYPE=wdtype)
