"""``FusedFp32GEMM`` (SPEC.md §4.3): the MoE router GEMM with fp32 logits, on 16-bit tensor cores.

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

Kernels: ``fp32_gemm_wgmma`` (sm_90a, warpgroup MMA, both operands from 128B-swizzled shared
memory) and ``fp32_gemm_mma`` (mma.sync + ldmatrix, sm_80 and later), one template for the three
GEMMs (operand layouts are constants), persistent CTAs with a multi-stage cp.async pipeline, tiles
chosen per specialisation (``tile_config``). With two A parts and one B part (hi.B + lo.B) a stage
holds both A parts and B once. ``d_weight`` reduces over all tokens with a split-K grid whose fp32
partials ``fp32_gemm_reduce`` sums in a fixed order (deterministic).
"""
from __future__ import annotations

import functools

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm

_GEMM_ARGS = ("ptr",) * 7 + ("i32", "i32") + ("i64",) * 8

GEMM_MMA = Kernel(
    op="fp32_gemm_mma",
    template="fp32_gemm.cu.j2",
    entry="linghe_fp32_gemm_mma",
    params=("A_KMAJOR", "B_KMAJOR", "MMA", "OUT", "VEC", "EVEN", "AP", "BM", "BN", "BK", "WM", "WN", "STAGES"),
    arg_types=_GEMM_ARGS,
)
GEMM_WGMMA = Kernel(
    op="fp32_gemm_wgmma",
    template="fp32_gemm_wgmma.cu.j2",
    entry="linghe_fp32_gemm_wgmma",
    params=("A_KMAJOR", "B_KMAJOR", "MMA", "OUT", "VEC", "EVEN", "AP", "BM", "BN", "BK", "STAGES"),
    arg_types=_GEMM_ARGS,
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
_WGMMA_SMEM = 200 * 1024  # pipeline budget per CTA on sm_90 (227 KiB available)
# FusedFp32GEMM.backward splits an fp32 grad_output into bf16 hi + lo (fp32-level gradients, twice
# the tensor-core work); False rounds it to bf16 (one pass, bf16-level).
SPLIT_GRAD_OUTPUT = True


def _pow2(n: int, lo: int, hi: int) -> int:
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _warps(bm: int, bn: int) -> tuple[int, int]:
    """Up to 4 warps over a bm x bn tile, warp tiles of 16..64 rows/columns, as square as possible."""
    wm = wn = 1
    while wm * wn < 4:
        if bm // wm >= bn // wn and bm // (2 * wm) >= 16:
            wm *= 2
        elif bn // (2 * wn) >= 16:
            wn *= 2
        elif bm // (2 * wm) >= 16:
            wm *= 2
        else:
            break
    return wm, wn


@functools.lru_cache(maxsize=None)
def tile_config(impl: str, kind: str, n_experts: int, dim: int, ap: int = 1) -> dict:
    """Tile constants of one GEMM for a model's (n_experts, dim); token counts stay run-time.

    ``ap``: A parts per pipeline stage (2 for the hi + lo split of grad_output against a bf16 operand).
    """
    if kind == "fwd":
        gm, gn = None, n_experts
    elif kind == "dx":
        gm, gn = None, dim
    else:
        gm, gn = n_experts, dim
    a_k, b_k = LAYOUTS[kind]
    if impl == "wgmma":
        bm = 128 if gm is None or gm > 64 else 64
        # An N-major B tile is made of 64-wide swizzle atoms; a K-major one of 8-row groups. The
        # forward keeps 128 x 128 tiles (8192 tokens x 256 experts is one wave of them); the
        # gradients' wide N (dim) takes 128 x 256: half the operand traffic per product.
        bn = _pow2(gn, 16, 128) if b_k else (256 if gn >= 256 else (128 if gn > 64 else 64))
        # A K-major row is one 64-wide swizzle atom; all-MN-major tiles (d_weight) take k steps of 32,
        # so that more (smaller) stages fit: a deeper prefetch for its long token loop.
        bk = 64 if (a_k or b_k) else 32
        stage = (ap * bm + bn) * bk * 2
        stages = max(3, min(6, _WGMMA_SMEM // stage))
        return dict(A_KMAJOR=a_k, B_KMAJOR=b_k, AP=ap, BM=bm, BN=bn, BK=bk, STAGES=stages)
    bm = 128 if gm is None else _pow2(gm, 16, 128)
    bn = _pow2(gn, 16, 128)
    wm, wn = _warps(bm, bn)
    # <= 99 KiB of shared memory: also fits sm_86/sm_89
    return dict(A_KMAJOR=a_k, B_KMAJOR=b_k, AP=ap, BM=bm, BN=bn, BK=32, WM=wm, WN=wn, STAGES=4 if ap == 1 else 3)


def smem_bytes(impl: str, c: dict) -> int:
    if impl == "wgmma":
        return c["STAGES"] * (c["AP"] * c["BM"] + c["BN"]) * c["BK"] * 2 + 1024  # + slack for 1 KiB alignment
    a = (c["BM"] * (c["BK"] + 8)) if c["A_KMAJOR"] else (c["BK"] * (c["BM"] + 8))
    b = (c["BN"] * (c["BK"] + 8)) if c["B_KMAJOR"] else (c["BK"] * (c["BN"] + 8))
    return c["STAGES"] * (c["AP"] * a + b) * 2


def threads(impl: str, c: dict) -> int:
    return 128 * (c["BM"] // 64) if impl == "wgmma" else 32 * c["WM"] * c["WN"]


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


# ---- operands --------------------------------------------------------------------
def _mma_tag(a_dtype, b_dtype) -> str:
    """f16 tensor cores when both operands are fp16; bf16 otherwise (other operands are split)."""
    return "f16" if a_dtype == b_dtype == torch.float16 else "bf16"


class _Operand:
    """A 2-D GEMM operand as 16-bit parts with a common row stride; ``exact``: the parts sum to it."""

    __slots__ = ("parts", "ld", "exact")

    def __init__(self, parts, ld, exact):
        self.parts, self.ld, self.exact = parts, ld, exact


def _operand(t: torch.Tensor, mma: str, device, max_parts: int = 3) -> _Operand:
    """``t`` itself when it has the MMA dtype, else its bf16 parts (all needed for exactness, at most max_parts)."""
    if V.DTYPE_TAG[t.dtype] == mma:
        t = V.aligned(t)
        return _Operand([t], t.shape[1], True)
    need = 3 if t.dtype == torch.float32 else 2  # fp32: 24 significant bits; fp16: 11
    n = min(need, max_parts)
    rows, cols = t.shape
    ld = -(-cols // 8) * 8  # 16-byte rows for the GEMM's cp.async copies
    parts = [torch.empty((rows, ld), dtype=torch.bfloat16, device=device) for _ in range(n)]
    if rows:
        s0, s1 = t.stride()
        contig = s1 == 1 and s0 % (16 // t.element_size()) == 0 and t.data_ptr() % 16 == 0
        ptrs = [p.data_ptr() for p in parts] + [0] * (3 - n)
        launch = SPLIT.launcher(device, V.DTYPE_TAG[t.dtype], n, contig)
        launch((V.cdiv(rows * (ld // 8), 256), 1, 1), (256, 1, 1), (t.data_ptr(), *ptrs, rows, cols, s0, s1, ld))
    return _Operand(parts, ld, n == need)


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


def _plan(impl, kind, mma, out_tag, vec, even, ap, n_experts, dim, device):
    """(launcher, k-step, shared bytes, threads, BM, BN, resident CTAs) of one GEMM specialisation (cached)."""
    key = (impl, kind, mma, out_tag, vec, even, ap, n_experts, dim, device.index)
    plan = _PLANS.get(key)
    if plan is None:
        c = tile_config(impl, kind, n_experts, dim, ap)
        if impl == "wgmma":
            launch = GEMM_WGMMA.launcher(device, c["A_KMAJOR"], c["B_KMAJOR"], mma, out_tag, vec, even, ap, c["BM"],
                                         c["BN"], c["BK"], c["STAGES"])
        else:
            launch = GEMM_MMA.launcher(device, c["A_KMAJOR"], c["B_KMAJOR"], mma, out_tag, vec, even, ap, c["BM"],
                                       c["BN"], c["BK"], c["WM"], c["WN"], c["STAGES"])
        smem = smem_bytes(impl, c)
        launch.set_dynamic_smem(smem)
        nthreads = threads(impl, c)
        _, sms = _device_info(device)
        resident = sms * (1 if impl == "wgmma" else 2 * (128 // nthreads))
        plan = _PLANS[key] = (launch, c["BK"], smem, nthreads, c["BM"], c["BN"], resident)
    return plan


def _gemm(impl, kind, mma, a: _Operand, b: _Operand, M, N, K, n_experts, dim, out, device, splits=1,
          k_chunk=None):
    """C[M, N] (out, or fp32 partials [splits, M, N]) = sum over the part pairs of A_i . B_j^T."""
    vec = a.ld % 8 == 0 and b.ld % 8 == 0
    ap, npass, code = _schedule(len(a.parts), a.exact, len(b.parts), b.exact)
    launch, bk, smem, nthreads, bm, bn, resident = _plan(impl, kind, mma, V.DTYPE_TAG[out.dtype], vec, N % 2 == 0, ap,
                                                         n_experts, dim, device)
    if k_chunk is None:
        k_chunk = -(-K // bk)
    pa, pb = a.parts, b.parts
    a0, a1, a2 = (t.data_ptr() for t in (pa + [pa[0]] * 2)[:3])  # unused parts: any valid pointer
    b0, b1, b2 = (t.data_ptr() for t in (pb + [pb[0]] * 2)[:3])
    tiles = -(-M // bm) * -(-N // bn)
    # Persistent CTAs: at most one resident wave, each walking tiles x, x + grid, ... with one pipeline.
    grid = min(tiles, max(1, resident // splits))
    launch((grid, 1, splits), (nthreads, 1, 1),
           (a0, a1, a2, b0, b1, b2, out.data_ptr(), npass, code, M, N, K, a.ld, b.ld, N, k_chunk, M * N), smem=smem)


def _dw_splits(impl, n_experts, dim, tokens, device) -> tuple[int, int]:
    """(splits, k-steps per split) for d_weight: enough CTAs for one wave, >= 8 k-steps each."""
    c = tile_config(impl, "dw", n_experts, dim, 1)  # BM, BN and BK do not depend on AP
    bk = c["BK"]
    _, sms = _device_info(device)
    per_sm = 1 if impl == "wgmma" else 2
    tiles = V.cdiv(n_experts, c["BM"]) * V.cdiv(dim, c["BN"])
    k_steps = V.cdiv(tokens, bk)
    splits = max(1, min((sms * per_sm) // tiles, k_steps // 8))
    chunk = V.cdiv(k_steps, splits)
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
    n_experts, dim = _check_operands(input, weight)
    device = V.devices(input=input, weight=weight)
    impl = _impl(device, impl)
    out = torch.empty((*input.shape[:-1], n_experts), dtype=torch.float32, device=device)
    x = input.reshape(-1, dim)
    M = x.shape[0]
    if M == 0:
        return out
    mma = _mma_tag(input.dtype, weight.dtype)
    _gemm(impl, "fwd", mma, _operand(x, mma, device), _operand(weight, mma, device), M, n_experts, dim, n_experts, dim,
          out, device)
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

    def grad(mma):
        if mma not in g_ops:
            g_ops[mma] = _operand(g, mma, device, max_parts=2 if split else 1)
        return g_ops[mma]

    if need_input_grad:
        mma = _mma_tag(g.dtype, weight.dtype)
        _gemm(impl, "dx", mma, grad(mma), _operand(weight, mma, device), M, dim, n_experts, n_experts, dim, dx,
              device)
    if need_weight_grad:
        x = input.reshape(M, dim)
        mma = _mma_tag(g.dtype, x.dtype)
        ga, xb = grad(mma), _operand(x, mma, device)
        splits, chunk = _dw_splits(impl, n_experts, dim, M, device)
        if splits == 1:
            _gemm(impl, "dw", mma, ga, xb, n_experts, dim, M, n_experts, dim, dw, device)
        else:
            part = torch.empty((splits, n_experts, dim), dtype=torch.float32, device=device)
            _gemm(impl, "dw", mma, ga, xb, n_experts, dim, M, n_experts, dim, part, device, splits=splits,
                  k_chunk=chunk)
            numel = n_experts * dim
            REDUCE.launcher(device, V.DTYPE_TAG[dw.dtype])((V.cdiv(numel, 1024), 1, 1), (256, 1, 1),
                                                           (part.data_ptr(), dw.data_ptr(), numel, splits))
    return dx, dw


class FusedFp32GEMM(torch.autograd.Function):
    """``logits = FusedFp32GEMM.apply(input, weight)``: fp32 ``input @ weight.T`` (SPEC.md §4.3).

    ``input`` [B, S, K] (or [M, K]) and ``weight`` [E, K], bf16 (fp16/fp32 accepted); logits fp32
    [B, S, E]. The backward takes any floating ``grad_output`` and returns ``d_input`` (dtype of
    ``weight``) and ``d_weight`` (dtype of ``input``), each only if autograd asks for it.
    """

    @staticmethod
    def forward(ctx, input, weight):
        logits = fp32_gemm_forward(input, weight)
        ctx.save_for_backward(input, weight)
        return logits

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need_input, need_weight = ctx.needs_input_grad[:2]
        return fp32_gemm_backward(grad_output, input, weight, need_input_grad=need_input,
                                  need_weight_grad=need_weight, split=SPLIT_GRAD_OUTPUT)


def _gemm_specs(impl, kind, n_experts, dim, mma, out, ap=1):
    c = dict(tile_config(impl, kind, n_experts, dim, ap))
    kernel = GEMM_WGMMA if impl == "wgmma" else GEMM_MMA
    return kernel, dict(c, MMA=mma, OUT=out, VEC=True, EVEN=True)


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
