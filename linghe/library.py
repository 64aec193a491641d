"""Every kernel entry point as a ``torch.library`` operator (namespace ``linghe``), for torch.compile.

Eager calls never come here: each documented function starts with ``if torch.compiler.is_compiling():``
and only then calls the function of the same name below, which calls the registered operator and maps
its outputs back to the documented API. torch.compile (and torch.export) therefore see one opaque
operator per kernel call, shaped by the fake implementation registered beside it, and eager calls keep
their direct path (the dispatcher costs ~2 us per call; ``tools/overhead.py`` measures it).

Registration uses ``Library.define`` + ``impl`` + ``register_fake`` rather than ``custom_op``: the same
schemas and checks at a quarter of the dispatch cost (a trivial op measured ~9 us per call through
custom_op and ~2 us through Library on a CPU host).
This module is imported on the first compiled call (or explicitly, e.g. before ``opcheck``), never by
``import linghe``.

Conventions of the operators (``torch.ops.linghe.<name>``):
- They are functional: no operator mutates or returns an input. Where the public API writes into a
  caller's buffer (``out=``, ``scale=``, ``rms=`` and the cross entropy's ``inplace=True``), the
  functions below call the operator and then ``copy_`` its result into that buffer, so the buffer is
  written as in eager mode (at the cost of one extra copy under torch.compile, and without the
  memory saving of ``inplace``).
- An output that a call does not produce (None in the public API, or "allocated, not written" as in
  output_mode 0 and 1) is returned as an empty ``[0]`` placeholder: schemas cannot return None, and
  unwritten memory would make compiled and eager results incomparable. The functions below put
  None or a fresh allocation back in its place.
- Host-synchronising conveniences are unavailable under compile: ``splits=None`` of the batched SiLU
  ops and ``num_out_tokens=None`` of the permute raise ValueError (pass the Python values).
"""
from __future__ import annotations

import numbers

import torch
from torch.library import Library, register_fake

from . import _validate as V
from .utils import fp32_gemm, gather, loss, norm, norm_gate, reduce, rope, scatter, silu

FP8, F32 = torch.float8_e4m3fn, torch.float32
_lib = Library("linghe", "FRAGMENT")
OPS: dict[str, torch._ops.OpOverload] = {}  # name -> operator, in registration order
FAKES: dict[str, object] = {}  # name -> its fake implementation (tests run it on CPU tensors)


def _register(schema: str, impl, fake):
    """Define one operator with its CUDA implementation and its fake (shape-only) implementation."""
    name = schema.split("(", 1)[0]
    _lib.define(schema, tags=(torch.Tag.pt2_compliant_tag,))
    _lib.impl(name, impl, "CUDA")
    register_fake(f"linghe::{name}", fake, lib=_lib)
    FAKES[name] = fake
    OPS[name] = getattr(torch.ops.linghe, name).default
    return OPS[name]


def _none(like: torch.Tensor, dtype=F32) -> torch.Tensor:
    """The placeholder for an output the call does not produce."""
    return torch.empty((0,), dtype=dtype, device=like.device)


def _empty(shape, dtype, like):
    return torch.empty(shape, dtype=dtype, device=like.device)


def _cdiv128(n):
    return (n + 127) // 128  # SymInt-friendly (fake implementations see symbolic sizes)


def _mode(output_mode):
    if isinstance(output_mode, bool) or output_mode not in (0, 1, 2):
        raise ValueError(f"output_mode must be 0 (row-wise), 1 (transposed) or 2 (both), got {output_mode!r}")


# ---- RMSNorm + block quantisation (SPEC.md §4.1) -----------------------------------------------
def _norm_impl(x, weight, eps, rms, round_scale, output_mode):
    # rms is an input only in mode 1 (elsewhere the public API's rms is an output buffer: see below)
    q, s, r, qt, st = norm.triton_rms_norm_and_block_quant_forward(
        x, weight, eps, None, None, rms if output_mode == 1 else None, round_scale, output_mode)
    if output_mode == 1:  # q and s are None, r is the caller's rms
        return _none(x, FP8), _none(x), _none(x), qt, st
    if output_mode == 0:
        return q, s, r, _none(x, FP8), _none(x)
    return q, s, r, qt, st


def _norm_fake(x, weight, eps, rms, round_scale, output_mode):
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    V.tensor("weight", weight, dtypes=V.FLOATING, ndim=1)
    _mode(output_mode)
    M, N = x.shape
    if N % 128 != 0 or N == 0:
        raise ValueError(f"x.shape[1] (N) must be a positive multiple of 128, got {N}")
    V.shape("weight", weight, (N,))
    if output_mode == 1:
        if rms is None:
            raise ValueError("rms is required when output_mode == 1: pass the reciprocal RMS per row")
        V.output("rms", rms, (M,), F32)
        q, s, r = _none(x, FP8), _none(x), _none(x)
    else:
        q, s, r = _empty((M, N), FP8, x), _empty((N // 128, M), F32, x), _empty((M,), F32, x)
    if output_mode == 0:
        return q, s, r, _none(x, FP8), _none(x)
    return q, s, r, _empty((N, M), FP8, x), _empty((_cdiv128(M), N), F32, x)


NORM = _register("rms_norm_block_quant(Tensor x, Tensor weight, float eps, Tensor? rms, bool round_scale, "
                 "int output_mode) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _norm_impl, _norm_fake)


def triton_rms_norm_and_block_quant_forward(x, weight, eps=1e-6, out=None, scale=None, rms=None,
                                            round_scale=False, output_mode=2):
    q, s, r, qt, st = NORM(x, weight, float(eps), rms if output_mode == 1 else None, bool(round_scale),
                           output_mode)
    M, N = x.shape
    for name, buf, shape, dtype in (("out", out, (M, N), FP8), ("scale", scale, (M, N // 128), F32)):
        if buf is not None:
            V.output(name, buf, shape, dtype)
    if output_mode == 1:
        return out, scale, rms, qt, st
    if out is not None:
        q = out.copy_(q)
    if scale is not None:
        scale.copy_(s.t())  # the documented quirk: the caller's buffer gets [M, N/128], s is returned
    if rms is not None:
        r = V.output("rms", rms, (M,), F32).copy_(r)
    if output_mode == 0:  # allocated, not written
        qt, st = _empty((N, M), FP8, x), _empty((_cdiv128(M), N), F32, x)
    return q, s, r, qt, st


# ---- SiLU + block quantisation (SPEC.md §4.6, §4.7) --------------------------------------------
def _silu_impl(x, round_scale, output_mode):
    q, s, qt, st = silu.triton_silu_and_block_quant_forward(x, None, None, round_scale, output_mode)
    if output_mode == 1:
        q, s = _none(x, FP8), _none(x)
    elif output_mode == 0:
        qt, st = _none(x, FP8), _none(x)
    return q, s, qt, st


def _silu_fake(x, round_scale, output_mode):
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    _mode(output_mode)
    M, n = silu._halves(x)
    q, s = (_none(x, FP8), _none(x)) if output_mode == 1 else (_empty((M, n), FP8, x), _empty((n // 128, M), F32, x))
    if output_mode == 0:
        return q, s, _none(x, FP8), _none(x)
    return q, s, _empty((n, M), FP8, x), _empty((_cdiv128(M), n), F32, x)


SILU_FWD = _register("silu_block_quant_forward(Tensor x, bool round_scale, int output_mode) "
                     "-> (Tensor, Tensor, Tensor, Tensor)", _silu_impl, _silu_fake)


def triton_silu_and_block_quant_forward(x, out=None, scale=None, round_scale=False, output_mode=2):
    q, s, qt, st = SILU_FWD(x, bool(round_scale), output_mode)
    M, n = x.shape[0], x.shape[1] // 2
    if out is not None:
        V.output("out", out, (M, n), FP8)
    if scale is not None:
        V.output("scale", scale, (n // 128, M), F32)
    if output_mode == 1:  # the row-wise pair: allocated (or the caller's), not written
        q = out if out is not None else _empty((M, n), FP8, x)
        s = scale if scale is not None else _empty((n // 128, M), F32, x)
    else:
        q = out.copy_(q) if out is not None else q
        s = scale.copy_(s) if scale is not None else s
    if output_mode == 0:
        qt, st = _empty((n, M), FP8, x), _empty((_cdiv128(M), n), F32, x)
    return q, s, qt, st


def _silu_bwd_impl(g, x, round_scale):
    return silu.triton_silu_and_block_quant_backward(g, x, round_scale)


def _silu_bwd_fake(g, x, round_scale):
    V.tensor("g", g, dtypes=V.FLOATING, ndim=2)
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    M, n = silu._halves(x)
    V.shape("g", g, (M, n))
    return (_empty((M, 2 * n), FP8, x), _empty((2 * n // 128, M), F32, x), _empty((2 * n, M), FP8, x),
            _empty((_cdiv128(M), 2 * n), F32, x))


SILU_BWD = _register("silu_block_quant_backward(Tensor g, Tensor x, bool round_scale) "
                     "-> (Tensor, Tensor, Tensor, Tensor)", _silu_bwd_impl, _silu_bwd_fake)


def triton_silu_and_block_quant_backward(g, x, round_scale=False):
    return SILU_BWD(g, x, bool(round_scale))


# ---- batched SiLU (SPEC.md §4.8, §4.9): sizes follow the Python splits ------------------------
def _splits(splits, fn):
    if splits is None:
        raise ValueError(f"{fn}: splits (counts.tolist()) is required under torch.compile: reading the "
                         f"counts from the device would synchronise and give data-dependent output sizes")
    if not isinstance(splits, (list, tuple)):
        raise TypeError(f"splits must be a list of ints (counts.tolist()), got {type(splits).__name__}")
    return list(splits)


def _batch_check(x, weight, counts, splits):
    V.tensor("x", x, dtypes=V.FLOATING, ndim=2)
    R, n = silu._halves(x)
    silu._weight(weight, R)
    V.tensor("counts", counts, dtypes=silu._COUNTS, ndim=1)
    if len(splits) != counts.shape[0]:
        raise ValueError(f"splits has {len(splits)} entries but counts has {counts.shape[0]}")
    return R, n, sum((c + 127) // 128 for c in splits)  # tiles: the transposed scales' row blocks


def _batch_impl(x, weight, counts, splits, round_scale, output_mode):
    q, s, qt, st = silu.triton_batch_weighted_silu_and_block_quant_forward(
        x, weight, counts, list(splits), None, None, round_scale, output_mode)
    if output_mode == 1:
        q, s = _none(x, FP8), _none(x)
    elif output_mode == 0:
        qt, st = _none(x, FP8), _none(x)
    return q, s, qt, st


def _batch_fake(x, weight, counts, splits, round_scale, output_mode):
    _mode(output_mode)
    R, n, tiles = _batch_check(x, weight, counts, splits)
    q, s = (_none(x, FP8), _none(x)) if output_mode == 1 else (_empty((R, n), FP8, x), _empty((R * n // 128,), F32, x))
    if output_mode == 0:
        return q, s, _none(x, FP8), _none(x)
    return q, s, _empty((R * n,), FP8, x), _empty((tiles * n,), F32, x)


BATCH_SILU_FWD = _register(
    "batch_silu_block_quant_forward(Tensor x, Tensor weight, Tensor counts, SymInt[] splits, bool round_scale, "
    "int output_mode) -> (Tensor, Tensor, Tensor, Tensor)", _batch_impl, _batch_fake)


def triton_batch_weighted_silu_and_block_quant_forward(x, weight, counts, splits=None, out=None, scale=None,
                                                       round_scale=False, output_mode=2):
    splits = _splits(splits, "triton_batch_weighted_silu_and_block_quant_forward")
    q, s, qt, st = BATCH_SILU_FWD(x, weight, counts, splits, bool(round_scale), output_mode)
    R, n = x.shape[0], x.shape[1] // 2
    if out is not None:
        V.output("out", out, (R, n), FP8)
    if scale is not None:
        V.tensor("scale", scale, dtypes=(F32,))
        if scale.numel() != R * n // 128 or not scale.is_contiguous():
            raise ValueError(f"scale must be a contiguous fp32 buffer of R*n/128 elements, got shape "
                             f"{tuple(scale.shape)}")
    if output_mode == 1:
        q = out if out is not None else _empty((R, n), FP8, x)
        s = scale if scale is not None else _empty((R * n // 128,), F32, x)
    else:
        q = out.copy_(q) if out is not None else q
        s = scale.copy_(s.view(scale.shape)) if scale is not None else s
    if output_mode == 0:
        tiles = sum((c + 127) // 128 for c in splits)
        qt, st = _empty((R * n,), FP8, x), _empty((tiles * n,), F32, x)
    return q, s, qt, st


def _batch_bwd_impl(g, x, weight, counts, splits, round_scale):
    return silu.triton_batch_weighted_silu_and_block_quant_backward(g, x, weight, counts, list(splits), round_scale)


def _batch_bwd_fake(g, x, weight, counts, splits, round_scale):
    V.tensor("g", g, dtypes=V.FLOATING, ndim=2)
    R, n, tiles = _batch_check(x, weight, counts, splits)
    V.shape("g", g, (R, n))
    return (_empty((R, 2 * n), FP8, x), _empty((R * 2 * n // 128,), F32, x), _empty((R, 1), weight.dtype, x),
            _empty((R * 2 * n,), FP8, x), _empty((tiles * 2 * n,), F32, x))


BATCH_SILU_BWD = _register(
    "batch_silu_block_quant_backward(Tensor g, Tensor x, Tensor weight, Tensor counts, SymInt[] splits, "
    "bool round_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _batch_bwd_impl, _batch_bwd_fake)


def triton_batch_weighted_silu_and_block_quant_backward(g, x, weight, counts, splits=None, round_scale=False):
    splits = _splits(splits, "triton_batch_weighted_silu_and_block_quant_backward")
    return BATCH_SILU_BWD(g, x, weight, counts, splits, bool(round_scale))


# ---- MoE permute / unpermute (SPEC.md §4.4, §4.5) ----------------------------------------------
def _permute_impl(inp, scale, probs, row_id_map, num_out_tokens, contiguous, tokens_per_expert):
    out, ps, pp = gather.triton_permute_with_mask_map(inp, scale, probs, row_id_map, num_out_tokens, contiguous,
                                                      tokens_per_expert)
    return out, _none(inp) if ps is None else ps, _none(inp) if pp is None else pp


def _permute_fake(inp, scale, probs, row_id_map, num_out_tokens, contiguous, tokens_per_expert):
    V.tensor("inp", inp, ndim=2)
    T, hidden = inp.shape
    V.tensor("row_id_map", row_id_map, dtypes=(torch.int32,), ndim=2)
    if row_id_map.shape[0] != T:
        raise ValueError(f"row_id_map must have shape ({T}, num_experts), got {tuple(row_id_map.shape)}")
    E = row_id_map.shape[1]
    if num_out_tokens < 0:
        raise ValueError(f"num_out_tokens must be >= 0, got {num_out_tokens}")
    if tokens_per_expert is not None:
        V.tensor("tokens_per_expert", tokens_per_expert, dtypes=gather.INTEGER, ndim=1)
        V.shape("tokens_per_expert", tokens_per_expert, (E,))
    out = _empty((num_out_tokens, hidden), inp.dtype, inp)
    if scale is None:
        ps = _none(inp)
    else:
        V.tensor("scale", scale, ndim=(1, 2))
        V.shape("scale", scale, (T, *scale.shape[1:]))
        ps = _empty((num_out_tokens, *scale.shape[1:]), scale.dtype, inp)
    if probs is None:
        pp = _none(inp)
    else:
        V.tensor("probs", probs, ndim=2)
        if not probs.is_floating_point():
            raise TypeError(f"probs must be a floating tensor, got dtype {probs.dtype}")
        V.shape("probs", probs, (T, E))
        pp = _empty((num_out_tokens,), probs.dtype, inp)
    return out, ps, pp


PERMUTE = _register(
    "permute_with_mask_map(Tensor inp, Tensor? scale, Tensor? probs, Tensor row_id_map, SymInt num_out_tokens, "
    "bool contiguous, Tensor? tokens_per_expert) -> (Tensor, Tensor, Tensor)", _permute_impl, _permute_fake)


def triton_permute_with_mask_map(inp, scale, probs, row_id_map, num_out_tokens, contiguous=True,
                                 tokens_per_expert=None):
    if num_out_tokens is None:
        raise ValueError("triton_permute_with_mask_map: num_out_tokens is required under torch.compile "
                         "(computing it from row_id_map would synchronise)")
    out, ps, pp = PERMUTE(inp, scale, probs, row_id_map, num_out_tokens, bool(contiguous), tokens_per_expert)
    return out, None if scale is None else ps, None if probs is None else pp


def _unpermute_impl(grad, row_id_map, probs):
    out, rp = scatter.triton_unpermute_with_mask_map(grad, row_id_map, probs)
    return out, _none(grad) if rp is None else rp


def _unpermute_fake(grad, row_id_map, probs):
    V.tensor("grad", grad, dtypes=V.FLOATING, ndim=2)
    V.tensor("row_id_map", row_id_map, dtypes=(torch.int32,), ndim=2)
    T, E = row_id_map.shape
    out = _empty((T, grad.shape[1]), grad.dtype, grad)
    if probs is None:
        return out, _none(grad)
    V.tensor("probs", probs, ndim=1)
    V.shape("probs", probs, (grad.shape[0],))
    return out, _empty((T, E), probs.dtype, grad)


UNPERMUTE = _register("unpermute_with_mask_map(Tensor grad, Tensor row_id_map, Tensor? probs) -> (Tensor, Tensor)",
                      _unpermute_impl, _unpermute_fake)


def triton_unpermute_with_mask_map(grad, row_id_map, probs):
    out, rp = UNPERMUTE(grad, row_id_map, probs)
    return out, None if probs is None else rp


# ---- QK norm + half RoPE (SPEC.md §4.2) --------------------------------------------------------
def _rope_dims(qkv, q_norm_weight, k_norm_weight, freqs, H, h):
    """(S, B, D) with the forward's checks (no cached tiling: sizes may be symbolic here)."""
    V.tensor("qkv", qkv, dtypes=V.FLOATING, ndim=3)
    V.tensor("q_norm_weight", q_norm_weight, dtypes=V.FLOATING, ndim=1)
    V.tensor("k_norm_weight", k_norm_weight, dtypes=V.FLOATING, ndim=1)
    V.tensor("freqs", freqs, dtypes=(F32,), ndim=2)
    H, h = rope._heads(H, h)
    S, B, dim = qkv.shape
    if dim % (H + 2 * h) != 0 or dim == 0:
        raise ValueError(f"qkv.shape[2] (dim = {dim}) must equal (H + 2*h) * head_dim for H={H}, h={h}")
    D = dim // (H + 2 * h)
    if D % 4 != 0:
        raise ValueError(f"head_dim = {D} must be a multiple of 4")
    V.shape("q_norm_weight", q_norm_weight, (D,))
    V.shape("k_norm_weight", k_norm_weight, (D,))
    V.shape("freqs", freqs, (S, D // 2))
    return S, B, D


def _rope_fwd_impl(qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps):
    return rope.qk_norm_half_rope_forward(qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps)


def _rope_fwd_fake(qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps):
    S, B, D = _rope_dims(qkv, q_norm_weight, k_norm_weight, freqs, H, h)
    return (_empty((B, S, H, D), qkv.dtype, qkv), _empty((B, S, h, D), qkv.dtype, qkv),
            _empty((B, S, h, D), qkv.dtype, qkv))


ROPE_FWD = _register("qk_norm_half_rope_forward(Tensor qkv, Tensor q_norm_weight, Tensor k_norm_weight, "
                     "Tensor freqs, int H, int h, float eps) -> (Tensor, Tensor, Tensor)",
                     _rope_fwd_impl, _rope_fwd_fake)


def qk_norm_half_rope_forward(qkv, q_norm_weight, k_norm_weight, freqs, H=32, h=4, eps=1e-6):
    return ROPE_FWD(qkv, q_norm_weight, k_norm_weight, freqs, H, h, float(eps))


def _rope_bwd_impl(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps):
    return rope.qk_norm_half_rope_backward(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs,
                                           H, h, eps)


def _rope_bwd_fake(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps):
    S, B, D = _rope_dims(qkv, q_norm_weight, k_norm_weight, freqs, H, h)
    for name, g, heads in (("grad_q", grad_q, H), ("grad_k", grad_k, h), ("grad_v", grad_v, h)):
        V.tensor(name, g, dtypes=V.FLOATING, ndim=4)
        if g.dtype != grad_q.dtype:
            raise TypeError(f"{name} must have the dtype of grad_q ({grad_q.dtype}), got {g.dtype}")
        V.shape(name, g, (B, S, heads, D))
    return (_empty((S, B, (H + 2 * h) * D), grad_q.dtype, qkv), _empty((D,), q_norm_weight.dtype, qkv),
            _empty((D,), k_norm_weight.dtype, qkv))


ROPE_BWD = _register("qk_norm_half_rope_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor qkv, "
                     "Tensor q_norm_weight, Tensor k_norm_weight, Tensor freqs, int H, int h, float eps) "
                     "-> (Tensor, Tensor, Tensor)", _rope_bwd_impl, _rope_bwd_fake)


def qk_norm_half_rope_backward(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs, H=32, h=4,
                               eps=1e-6):
    return ROPE_BWD(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight, freqs, H, h, float(eps))


# ---- group RMSNorm with sigmoid gate (SPEC.md §4.13) -------------------------------------------
def _gate_fwd_impl(x, gate, weight, eps, group_size):
    return norm_gate.group_norm_gate_forward(x, gate, weight, eps, group_size)


def _gate_fwd_fake(x, gate, weight, eps, group_size):
    S, B, dim, _ = norm_gate._check(x, gate, weight, eps, group_size)
    return _empty((S, B, dim), x.dtype, x)


GATE_FWD = _register("group_norm_gate_forward(Tensor x, Tensor gate, Tensor weight, float eps, int group_size) "
                     "-> Tensor", _gate_fwd_impl, _gate_fwd_fake)


def group_norm_gate_forward(x, gate, weight, eps=1e-6, group_size=4):
    return GATE_FWD(x, gate, weight, float(eps), group_size)


def _gate_bwd_impl(grad, x, gate, weight, eps, group_size):
    return norm_gate.group_norm_gate_backward(grad, x, gate, weight, eps, group_size)


def _gate_bwd_fake(grad, x, gate, weight, eps, group_size):
    S, B, dim, _ = norm_gate._check(x, gate, weight, eps, group_size)
    V.tensor("grad", grad, dtypes=V.FLOATING)
    V.shape("grad", grad, (S, B, dim))
    return _empty(x.shape, x.dtype, x), _empty((S, B, dim), gate.dtype, x), _empty((dim,), weight.dtype, x)


GATE_BWD = _register("group_norm_gate_backward(Tensor grad, Tensor x, Tensor gate, Tensor weight, float eps, "
                     "int group_size) -> (Tensor, Tensor, Tensor)", _gate_bwd_impl, _gate_bwd_fake)


def group_norm_gate_backward(grad, x, gate, weight, eps=1e-6, group_size=4):
    return GATE_BWD(grad, x, gate, weight, float(eps), group_size)


# ---- router GEMM with fp32 output (SPEC.md §4.3) -----------------------------------------------
def _gemm_fwd_impl(input, weight, impl):
    return fp32_gemm.fp32_gemm_forward(input, weight, impl)


def _gemm_fwd_fake(input, weight, impl):
    n_experts, _ = fp32_gemm._check_operands(input, weight)
    return _empty((*input.shape[:-1], n_experts), F32, input)


GEMM_FWD = _register("fp32_gemm_forward(Tensor input, Tensor weight, str? impl) -> Tensor",
                     _gemm_fwd_impl, _gemm_fwd_fake)


def fp32_gemm_forward(input, weight, impl=None):
    return GEMM_FWD(input, weight, impl)


def _gemm_bwd_impl(grad_output, input, weight, need_input_grad, need_weight_grad, split, grad_dtype, impl):
    dx, dw = fp32_gemm.fp32_gemm_backward(grad_output, input, weight, need_input_grad, need_weight_grad, split,
                                          grad_dtype, impl)
    return _none(input) if dx is None else dx, _none(input) if dw is None else dw


def _gemm_bwd_fake(grad_output, input, weight, need_input_grad, need_weight_grad, split, grad_dtype, impl):
    n_experts, dim = fp32_gemm._check_operands(input, weight)
    V.tensor("grad_output", grad_output, dtypes=V.FLOATING)
    V.shape("grad_output", grad_output, (*input.shape[:-1], n_experts))
    if grad_dtype is not None and grad_dtype not in V.FLOATING:
        raise TypeError(f"grad_dtype must be None or one of bfloat16, float16, float32, got {grad_dtype}")
    dx = _empty(input.shape, grad_dtype or weight.dtype, input) if need_input_grad else _none(input)
    dw = _empty((n_experts, dim), grad_dtype or input.dtype, input) if need_weight_grad else _none(input)
    return dx, dw


GEMM_BWD = _register("fp32_gemm_backward(Tensor grad_output, Tensor input, Tensor weight, bool need_input_grad, "
                     "bool need_weight_grad, bool split, ScalarType? grad_dtype, str? impl) -> (Tensor, Tensor)",
                     _gemm_bwd_impl, _gemm_bwd_fake)


def fp32_gemm_backward(grad_output, input, weight, need_input_grad=True, need_weight_grad=True, split=True,
                       grad_dtype=None, impl=None):
    need_input_grad, need_weight_grad = bool(need_input_grad), bool(need_weight_grad)
    dx, dw = GEMM_BWD(grad_output, input, weight, need_input_grad, need_weight_grad, bool(split), grad_dtype, impl)
    return dx if need_input_grad else None, dw if need_weight_grad else None


# ---- softmax cross entropy (SPEC.md §4.10, single device) --------------------------------------
def _ce_fwd_impl(logits, labels):
    return loss.softmax_cross_entropy_forward(logits, labels)


def _ce_fwd_fake(logits, labels):
    M, _ = loss.check_inputs(logits, labels)
    return _empty(labels.shape, F32, logits), _empty((M, 2), F32, logits)


CE_FWD = _register("softmax_cross_entropy_forward(Tensor logits, Tensor labels) -> (Tensor, Tensor)",
                   _ce_fwd_impl, _ce_fwd_fake)


def softmax_cross_entropy_forward(logits, labels):
    return CE_FWD(logits, labels)


def _ce_bwd_impl(logits, labels, stats, grad_output):
    grad = loss.softmax_cross_entropy_backward(logits, labels, stats, grad_output, False)
    # The eager gradient may start a few elements into its allocation (aligned like the logits for the
    # kernel's lane map); compiled code expects what the fake promises: a fresh, offset-free tensor.
    return grad.clone() if grad.storage_offset() else grad


def _ce_bwd_fake(logits, labels, stats, grad_output):
    M, _ = loss.check_inputs(logits, labels)
    loss.check_backward_inputs(labels.shape, stats, grad_output, M)
    return _empty(logits.shape, logits.dtype, logits)


CE_BWD = _register("softmax_cross_entropy_backward(Tensor logits, Tensor labels, Tensor stats, Tensor grad_output) "
                   "-> Tensor", _ce_bwd_impl, _ce_bwd_fake)


def softmax_cross_entropy_backward(logits, labels, stats, grad_output, inplace=False):
    inplace = loss.check_inplace_flag(inplace)
    if inplace and not logits.is_contiguous():
        raise ValueError("logits must be contiguous when inplace=True: the gradient is written into its storage")
    grad = CE_BWD(logits, labels, stats, grad_output)
    return logits.copy_(grad) if inplace else grad


# ---- list reductions (SPEC.md §4.11, §4.12) ----------------------------------------------------
def _sum_impl(xs, ord):
    return reduce.triton_batch_sum_with_ord(xs, ord)


def _sum_fake(xs, ord):
    return torch.empty((), dtype=F32, device=reduce._validated(xs, reduce.SUM_KINDS))


def _zero_impl(xs):
    return reduce.triton_batch_count_zero(xs)


def _zero_fake(xs):
    return torch.empty((), dtype=torch.int64, device=reduce._validated(xs, reduce.ZERO_KINDS))


BATCH_SUM = _register("batch_sum_with_ord(Tensor[] xs, int ord) -> Tensor", _sum_impl, _sum_fake)
BATCH_COUNT_ZERO = _register("batch_count_zero(Tensor[] xs) -> Tensor", _zero_impl, _zero_fake)


def _no_tensors(dtype):
    # An operator needs a tensor to find its device: the empty list's 0 is made here, on the current
    # CUDA device as in eager mode.
    return torch.zeros((), dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")


def triton_batch_sum_with_ord(xs, ord=2):
    if isinstance(ord, bool) or not isinstance(ord, numbers.Real):
        raise TypeError(f"ord must be 1 or 2, got {type(ord).__name__} {ord!r}")
    if ord not in (1, 2):
        raise ValueError(f"ord must be 1 (sum of |x|) or 2 (sum of squares), got {ord!r}")
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list or tuple of tensors, got {type(xs).__name__}")
    return BATCH_SUM(list(xs), int(ord)) if len(xs) else _no_tensors(F32)


def triton_batch_count_zero(xs):
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list or tuple of tensors, got {type(xs).__name__}")
    return BATCH_COUNT_ZERO(list(xs)) if len(xs) else _no_tensors(torch.int64)
