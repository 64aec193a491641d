"""QK RMSNorm + half rotary embedding on a fused QKV projection (SPEC.md §4.2), forward and backward.

The autograd Function :class:`linghe.facade.rope.QkNormHalfRopeFunction` calls these two functions;
they are public so that callers can use them without autograd.

Kernels: ``rope_fwd.cu.j2`` (one CTA per token and pass of head slots), ``rope_bwd.cu.j2`` (a grid of
CTAs that fits on the device at once, each looping over tokens and keeping the weight gradient of its
lanes in fp32 registers, then writing one fp32 partial per CTA) and ``rope_reduce.cu.j2`` (adds the
partials in a fixed order). The weight gradients are therefore deterministic: the same inputs on the
same device give bitwise the same result, with no atomics.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm

MAX_THREADS = 512   # per CTA; more head slots than fit are split into passes (grid.y)
REDUCE_ROWS = 32    # rows of partials summed in parallel per column by the weight-gradient reduction
REDUCE_UNROLL = 16  # loads in flight per thread of that reduction
_ESIZE = {"bf16": 2, "f16": 2, "f32": 4}


@lru_cache(maxsize=None)
def _plan(H: int, HKV: int, D: int, esize: int, vec_bytes: int) -> dict:
    """Thread layout for head dim D and the widest activation element: see templates/rope.cuh.

    VEC lanes per vector (at most vec_bytes, dividing D/4), T = D/4/VEC threads per head padded to TP
    (a power of two), SP head slots per CTA of NT threads, PASSES CTAs per token. The forward uses
    16-byte vectors; the backward 8-byte ones, which halves its per-thread state (it holds input,
    gradient and weight-gradient accumulators for 4*VEC lanes) so more CTAs fit per SM.
    """
    d4 = D // 4
    vec = max(1, vec_bytes // esize)
    while d4 % vec:
        vec //= 2
    t = d4 // vec
    tp = 1 << (t - 1).bit_length()
    if tp > 32:
        raise ValueError(f"head_dim {D} is too large: at most {32 * 4 * vec} is supported for this dtype")
    slots = H + 2 * HKV
    passes = V.cdiv(slots, max(1, MAX_THREADS // tp))
    sp = V.cdiv(slots, passes)
    return {"VEC": vec, "T": t, "TP": tp, "SP": sp, "NT": V.cdiv(sp * tp, 32) * 32, "PASSES": passes}


FWD_VEC_BYTES, BWD_VEC_BYTES = 16, 8
# Forward: tokens per CTA (teams of NT threads; the weights and the CTA start are shared) and the
# threads per SM its register budget must allow (__launch_bounds__ min-blocks = that // CTA threads).
FWD_TOKENS, FWD_MIN_THREADS = 1, 1152
# Backward: it loops over tokens and relies on several CTAs per SM to keep enough reads in flight;
# with BWD_STAGES >= 2 each thread also keeps its next BWD_STAGES - 1 tokens in flight through cp.async
# (0: plain loads plus an L2 prefetch of the next token).
BWD_MIN_THREADS = 576
BWD_STAGES = 2
BWD_SMEM = 44 * 1024   # static shared memory the backward may use (of 48 KiB)


@lru_cache(maxsize=None)
def _fwd_context(H, HKV, D, DTYPE, QWDTYPE, KWDTYPE):
    plan = _plan(H, HKV, D, _ESIZE[DTYPE], FWD_VEC_BYTES)
    tok = max(1, min(FWD_TOKENS, 1024 // plan["NT"]))
    return dict(plan, TOK=tok, MIN_BLOCKS=max(1, FWD_MIN_THREADS // (plan["NT"] * tok)))


@lru_cache(maxsize=None)
def _bwd_context(H, HKV, D, DTYPE, GDTYPE, QWDTYPE, KWDTYPE):
    plan = _plan(H, HKV, D, max(_ESIZE[DTYPE], _ESIZE[GDTYPE]), BWD_VEC_BYTES)
    chunks = [plan["VEC"] * _ESIZE[t] for t in (DTYPE, GDTYPE)]  # bytes of one vector of qkv, of the grads
    stages = BWD_STAGES if min(chunks) >= 4 else 0  # cp.async copies 4, 8 or 16 bytes
    while stages >= 2 and stages * 4 * plan["NT"] * sum(chunks) + 32 * D > BWD_SMEM:
        stages -= 1
    return dict(plan, MIN_BLOCKS=max(1, BWD_MIN_THREADS // plan["NT"]), STAGES=stages if stages >= 2 else 0)


ROPE_FWD = Kernel(
    op="qk_norm_half_rope_fwd",
    template="rope_fwd.cu.j2",
    entry="linghe_qk_norm_half_rope_fwd",
    params=("H", "HKV", "D", "DTYPE", "QWDTYPE", "KWDTYPE"),
    arg_types=("ptr", "i64", "i64", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64", "f32"),
    context=_fwd_context,
)

ROPE_BWD = Kernel(
    op="qk_norm_half_rope_bwd",
    template="rope_bwd.cu.j2",
    entry="linghe_qk_norm_half_rope_bwd",
    params=("H", "HKV", "D", "DTYPE", "GDTYPE", "QWDTYPE", "KWDTYPE"),
    arg_types=("ptr", "i64", "i64",
               "ptr", "i64", "i64", "i64", "ptr", "i64", "i64", "i64", "ptr", "i64", "i64", "i64",
               "ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64", "f32"),
    context=_bwd_context,
)

ROPE_WGRAD = Kernel(
    op="qk_norm_half_rope_wgrad",
    template="rope_reduce.cu.j2",
    entry="linghe_qk_norm_half_rope_wgrad",
    params=("D", "QWDTYPE", "KWDTYPE"),
    arg_types=("ptr", "i64", "ptr", "ptr"),
    context=lambda D, QWDTYPE, KWDTYPE: {"ROWS": REDUCE_ROWS, "UNROLL": REDUCE_UNROLL},
)


# ---------------------------------------------------------------- checks ----
def _heads(H, h) -> tuple[int, int]:
    H, h = V.integer("H", H, 1), V.integer("h", h, 1)
    if H % h:
        raise ValueError(f"H ({H} query heads) must be a multiple of h ({h} key/value heads)")
    return H, h


def _eps(eps) -> float:
    try:
        return float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}") from None


def _check_inputs(qkv, q_norm_weight, k_norm_weight, freqs, H, h, vec_bytes, grad=None):
    """Types, ranks, dtypes and shapes of the forward's inputs; returns (S, B, D, H, h, plan).

    ``grad`` (a validated gradient, backward only) joins qkv in fixing the vector width.
    """
    V.tensor("qkv", qkv, dtypes=V.FLOATING, ndim=3)
    V.tensor("q_norm_weight", q_norm_weight, dtypes=V.FLOATING, ndim=1)
    V.tensor("k_norm_weight", k_norm_weight, dtypes=V.FLOATING, ndim=1)
    V.tensor("freqs", freqs, dtypes=(torch.float32,), ndim=2)
    H, h = _heads(H, h)
    S, B, dim = qkv.shape
    if S * B >= 2**31:  # the kernels index tokens with 32-bit grid coordinates
        raise ValueError(f"qkv has S*B = {S * B} tokens; at most 2**31 - 1 are supported")
    slots = H + 2 * h
    if dim % slots or dim == 0:
        raise ValueError(f"qkv.shape[2] (dim = {dim}) must equal (H + 2*h) * head_dim = {slots} * head_dim "
                         f"for H={H}, h={h}")
    D = dim // slots
    if D % 4:
        raise ValueError(f"head_dim = qkv.shape[2] / (H + 2*h) = {D} must be a multiple of 4 "
                         f"(the rotary half is split in two quarters)")
    esize = max(qkv.element_size(), grad.element_size() if grad is not None else 0)
    plan = _plan(H, h, D, esize, vec_bytes)
    V.shape("q_norm_weight", q_norm_weight, (D,))
    V.shape("k_norm_weight", k_norm_weight, (D,))
    if tuple(freqs.shape) != (S, D // 2):
        raise ValueError(f"freqs must have shape (S, head_dim/2) = {(S, D // 2)}, got {tuple(freqs.shape)}")
    return S, B, D, H, h, plan


def _vector_ready(x: torch.Tensor, vec: int):
    """(tensor, element strides) such that VEC-element vectors along the last dim are aligned.

    Honours any strides whose last one is 1 (e.g. qkv a column slice of a wider tensor, or transposed
    gradients); copies only when the last dim is not dense or a vector would be misaligned.
    """
    if x.is_contiguous() and x.data_ptr() % 16 == 0:  # the common case, cheaply
        return x, x.stride()

    def strides(t):
        return [0 if n == 1 else st for n, st in zip(t.shape, t.stride())]

    st = strides(x)
    if st[-1] != 1 or any(s % vec for s in st[:-1]) or x.data_ptr() % (vec * x.element_size()):
        x = x.contiguous()
        if x.data_ptr() % (vec * x.element_size()):
            x = x.clone(memory_format=torch.contiguous_format)
        st = strides(x)
    return x, st


def _aligned_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` dense and 16-byte aligned (the forward reads the weights as 16-byte vectors); a copy only
    for a strided or offset view."""
    return _vector_ready(w, 16 // w.element_size())[0]


# ---------------------------------------------------------------- API -------
def qk_norm_half_rope_forward(qkv, q_norm_weight, k_norm_weight, freqs, H=32, h=4, eps=1e-6):
    """Split ``qkv`` [S, B, (H+2h)*D] into heads, RMS-normalise q and k heads, rotate their first D/2 lanes.

    ``freqs`` [S, D/2] fp32 holds the rotation angles per position. Returns ``(q, k, v)``, contiguous
    ``[B, S, H, D]``, ``[B, S, h, D]``, ``[B, S, h, D]`` in ``qkv.dtype``; v is copied unchanged.
    Math in fp32.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.qk_norm_half_rope_forward(qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps)
    S, B, D, H, h, plan = _check_inputs(qkv, q_norm_weight, k_norm_weight, freqs, H, h, FWD_VEC_BYTES)
    eps = _eps(eps)
    device = V.devices(qkv=qkv, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight, freqs=freqs)
    q = torch.empty((B, S, H, D), dtype=qkv.dtype, device=device)
    k = torch.empty((B, S, h, D), dtype=qkv.dtype, device=device)
    v = torch.empty((B, S, h, D), dtype=qkv.dtype, device=device)
    tokens = S * B
    if tokens == 0:
        return q, k, v
    x, st = _vector_ready(qkv, plan["VEC"])
    qw, kw, f = _aligned_weight(q_norm_weight), _aligned_weight(k_norm_weight), freqs.contiguous()
    tag = V.DTYPE_TAG
    launch = ROPE_FWD.launcher(device, H, h, D, tag[x.dtype], tag[qw.dtype], tag[kw.dtype])
    tok = _fwd_context(H, h, D, tag[x.dtype], tag[qw.dtype], tag[kw.dtype])["TOK"]
    launch((V.cdiv(tokens, tok), plan["PASSES"], 1), (plan["NT"], tok, 1),
           (x.data_ptr(), st[0], st[1], qw.data_ptr(), kw.data_ptr(), f.data_ptr(),
            q.data_ptr(), k.data_ptr(), v.data_ptr(), S, B, eps))
    return q, k, v


def qk_norm_half_rope_backward(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs, H=32, h=4,
                               eps=1e-6):
    """Gradients of :func:`qk_norm_half_rope_forward`: returns ``(dqkv, d_q_norm_weight, d_k_norm_weight)``.

    ``grad_q`` [B, S, H, D], ``grad_k`` and ``grad_v`` [B, S, h, D] (any strides, one floating dtype).
    ``dqkv`` is a contiguous [S, B, (H+2h)*D] tensor in the grads' dtype, in qkv's interleaved head
    layout. The weight gradients are summed over all tokens and heads in fp32 (fixed order, no atomics:
    bitwise reproducible on one device) and returned in each weight's dtype.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.qk_norm_half_rope_backward(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs,
                                                  H, h, eps)
    for name, g in (("grad_q", grad_q), ("grad_k", grad_k), ("grad_v", grad_v)):
        V.tensor(name, g, dtypes=V.FLOATING, ndim=4)
    for name, g in (("grad_k", grad_k), ("grad_v", grad_v)):
        if g.dtype != grad_q.dtype:
            raise TypeError(f"{name} must have the dtype of grad_q ({grad_q.dtype}), got {g.dtype}")
    S, B, D, H, h, plan = _check_inputs(qkv, q_norm_weight, k_norm_weight, freqs, H, h, BWD_VEC_BYTES, grad_q)
    V.shape("grad_q", grad_q, (B, S, H, D))
    V.shape("grad_k", grad_k, (B, S, h, D))
    V.shape("grad_v", grad_v, (B, S, h, D))
    eps = _eps(eps)
    device = V.devices(grad_q=grad_q, grad_k=grad_k, grad_v=grad_v, qkv=qkv, q_norm_weight=q_norm_weight,
                       k_norm_weight=k_norm_weight, freqs=freqs)
    dqkv = torch.empty((S, B, (H + 2 * h) * D), dtype=grad_q.dtype, device=device)
    tokens = S * B
    if tokens == 0:
        return (dqkv, torch.zeros(D, dtype=q_norm_weight.dtype, device=device),
                torch.zeros(D, dtype=k_norm_weight.dtype, device=device))
    vec = plan["VEC"]
    x, xs = _vector_ready(qkv, vec)
    gq, gqs = _vector_ready(grad_q, vec)
    gk, gks = _vector_ready(grad_k, vec)
    gv, gvs = _vector_ready(grad_v, vec)
    qw, kw, f = q_norm_weight.contiguous(), k_norm_weight.contiguous(), freqs.contiguous()
    tag = V.DTYPE_TAG
    launch = ROPE_BWD.launcher(device, H, h, D, tag[x.dtype], tag[gq.dtype], tag[qw.dtype], tag[kw.dtype])
    passes, threads = plan["PASSES"], plan["NT"]
    ctas = min(tokens, max(1, launch.resident_ctas(threads) // passes))
    partial = torch.empty((passes * ctas, 2, D), dtype=torch.float32, device=device)
    launch((ctas, passes, 1), (threads, 1, 1),
           (x.data_ptr(), xs[0], xs[1],
            gq.data_ptr(), gqs[0], gqs[1], gqs[2], gk.data_ptr(), gks[0], gks[1], gks[2],
            gv.data_ptr(), gvs[0], gvs[1], gvs[2],
            qw.data_ptr(), kw.data_ptr(), f.data_ptr(), dqkv.data_ptr(), partial.data_ptr(), S, B, eps))
    dqw = torch.empty(D, dtype=qw.dtype, device=device)
    dkw = torch.empty(D, dtype=kw.dtype, device=device)
    reduce = ROPE_WGRAD.launcher(device, D, tag[qw.dtype], tag[kw.dtype])
    reduce((V.cdiv(2 * D, 32), 1, 1), (32, REDUCE_ROWS, 1), (partial.data_ptr(), passes * ctas, dqw.data_ptr(),
                                                            dkw.data_ptr()), pdl=True)
    return dqkv, dqw, dkw


@register_prewarm("qk_norm_half_rope")
def _prewarm(preset):
    H, h, D, dtype = preset["heads"], preset["kv_heads"], preset["head_dim"], preset["dtype"]
    for wdtype in dict.fromkeys((dtype, "f32")):  # norm weights in the model dtype or kept in fp32
        yield ROPE_FWD, dict(H=H, HKV=h, D=D, DTYPE=dtype, QWDTYPE=wdtype, KWDTYPE=wdtype)
        yield ROPE_BWD, dict(H=H, HKV=h, D=D, DTYPE=dtype, GDTYPE=dtype, QWDTYPE=wdtype, KWDTYPE=wdtype)
        yield ROPE_WGRAD, dict(D=D, QWDTYPE=wdtype, KWDTYPE=wdtype)
