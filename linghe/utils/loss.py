"""Softmax cross entropy over a large vocabulary (SPEC.md §4.10), as plain functions.

``softmax_cross_entropy_forward`` gives the per-token loss and per-row statistics;
``softmax_cross_entropy_backward`` turns them into the logits gradient, optionally written
into the logits' own storage. :class:`linghe.facade.loss.SoftmaxCrossEntropyFunction`
wraps the pair for autograd.

Labels are never inspected on the host (that would synchronise): a negative label gives
loss 0 and a zero gradient row, a label >= vocab gives NaN, and neither is ever used as an
index.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .. import _validate as V
from ..kernel import Kernel, register_prewarm

UNROLL = 4          # 16-byte loads in flight per thread
MAX_TPR = 512       # threads per row for large vocabularies
MIN_THREADS = 256   # CTA size when several short rows share a CTA
MAX_VOCAB = 1 << 30  # in-row indices are 32-bit in the kernels
BWD_ALIGN = 512     # bytes: the backward's warp accesses follow this grid, whatever V does to row starts
                    # (H200, V = 157175: 16 -> 1524/1743 us out of/in place, 128 -> 1417/1410, 512 -> 1360/1351)

LABEL_DTYPES = (torch.int64, torch.int32)
LABEL_TAG = {torch.int64: "i64", torch.int32: "i32"}
GRAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
GRAD_TAG = {**V.DTYPE_TAG, torch.float64: "f64"}
ELEMENT_BYTES = {"bf16": 2, "f16": 2, "f32": 4}


@lru_cache(maxsize=None)
def threads_per_row(vocab: int, dtype: str) -> int:
    """Threads sharing a row: enough for UNROLL vectors each, a power of two in [32, MAX_TPR]."""
    vectors = V.cdiv(vocab, 16 // ELEMENT_BYTES[dtype])
    tpr = 32
    while tpr < MAX_TPR and tpr * UNROLL < vectors:
        tpr *= 2
    return tpr


def _rows(TPR):
    return max(1, MIN_THREADS // TPR)


def _forward_context(DTYPE, LABEL, TPR):
    return {"PASS": "fwd", "ROWS": _rows(TPR), "UNROLL": UNROLL}


def _backward_context(DTYPE, LABEL, GDTYPE, TPR):
    # 3 resident CTAs of 512 threads (<= 42 registers): one CTA's per-row start-up latency is
    # covered by the others' streams.
    return {"PASS": "bwd", "ROWS": _rows(TPR), "UNROLL": UNROLL, "MIN_BLOCKS": max(1, 1536 // (TPR * _rows(TPR))),
            "ALIGN": min(BWD_ALIGN, 16 * TPR)}  # a warp's first step skips < TPR vectors


CE_FORWARD = Kernel(
    op="cross_entropy_fwd",
    template="cross_entropy.cu.j2",
    entry="linghe_cross_entropy_fwd",
    params=("DTYPE", "LABEL", "TPR"),
    # logits, labels, loss, stats, M, V, v_start, shard_logit (the last two: vocabulary-parallel shards)
    arg_types=("ptr", "ptr", "ptr", "ptr", "i64", "i64", "i64", "ptr"),
    context=_forward_context,
)

CE_BACKWARD = Kernel(
    op="cross_entropy_bwd",
    template="cross_entropy.cu.j2",
    entry="linghe_cross_entropy_bwd",
    params=("DTYPE", "LABEL", "GDTYPE", "TPR"),
    # logits, labels, stats, grad_output, out, M, V, g_inner, g_stride0, g_stride1, v_start, v_total
    arg_types=("ptr", "ptr", "ptr", "ptr", "ptr", "i64", "i64", "i64", "i64", "i64", "i64", "i64"),
    context=_backward_context,
)


# ---- validation (types, ranks, shapes first; devices last) ---------------------------------
def check_inputs(logits, labels, inplace=False):
    """Validate ``logits`` [M, V] or [B, S, V] and ``labels`` (M elements); returns (M, V)."""
    V.tensor("logits", logits, dtypes=V.FLOATING, ndim=(2, 3))
    V.tensor("labels", labels, dtypes=LABEL_DTYPES)
    vocab = logits.shape[-1]
    if vocab == 0 or vocab > MAX_VOCAB:
        raise ValueError(f"logits' last (vocabulary) dimension must be in [1, {MAX_VOCAB}], "
                         f"got shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    M = 1
    for d in lead:
        M *= d
    if tuple(labels.shape) not in (lead, (M,)):
        raise ValueError(f"labels must have shape {lead}" + (f" or ({M},)" if len(lead) > 1 else "") +
                         f" to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if inplace and not logits.is_contiguous():
        raise ValueError("logits must be contiguous when inplace=True: the gradient is written into its storage")
    return M, vocab


def check_inplace_flag(inplace) -> bool:
    # The later-revision signature puts ignore_index (e.g. -100) third; taking that for a truthy
    # inplace flag would silently destroy the caller's logits.
    if isinstance(inplace, bool):
        return inplace
    if isinstance(inplace, int) and inplace in (0, 1):
        return bool(inplace)
    raise TypeError(f"inplace must be a bool, got {inplace!r} (the third positional argument is inplace; "
                    f"this version has no ignore_index: negative labels are always ignored)")


def check_backward_inputs(loss_shape, stats, grad_output, M):
    """``stats`` as the forward made it; ``grad_output`` shaped like the loss (or [M]), any float dtype."""
    V.output("stats", stats, (M, 2), torch.float32)
    V.tensor("grad_output", grad_output, dtypes=GRAD_DTYPES)
    if tuple(grad_output.shape) not in (tuple(loss_shape), (M,)):
        raise ValueError(f"grad_output must have the loss's shape {tuple(loss_shape)}, "
                         f"got {tuple(grad_output.shape)}")


# ---- launches (inputs already validated) ---------------------------------------------------
def _launch_forward(x, labels, loss_ptr, stats, shard_ptr, v_start, device):
    M, vocab = x.shape
    dtype = V.DTYPE_TAG[x.dtype]
    tpr = threads_per_row(vocab, dtype)
    rows = _rows(tpr)
    launch = CE_FORWARD.launcher(device, dtype, LABEL_TAG[labels.dtype], tpr)
    launch((V.cdiv(M, rows), 1, 1), (tpr * rows, 1, 1),
           (x.data_ptr(), labels.data_ptr(), loss_ptr, stats.data_ptr(), M, vocab, v_start, shard_ptr))


def forward_2d(x, labels, loss_shape, device):
    """x [M, V] contiguous, labels [M] contiguous -> (loss shaped loss_shape, stats [M, 2])."""
    M = x.shape[0]
    loss = torch.empty(loss_shape, dtype=torch.float32, device=device)
    stats = torch.empty((M, 2), dtype=torch.float32, device=device)
    if M > 0:
        _launch_forward(x, labels, loss.data_ptr(), stats, None, 0, device)
    return loss, stats


def forward_shard_2d(x, labels, v_start, device):
    """One vocabulary shard: x [M, V_local] holds global columns [v_start, v_start + V_local), labels [M]
    global ids -> (stats [M, 2] over the shard, label_logit [M] fp32: the label's logit where this shard
    holds it, else 0). :mod:`linghe.utils.loss_tp` combines the shards into the loss."""
    M = x.shape[0]
    stats = torch.empty((M, 2), dtype=torch.float32, device=device)
    label_logit = torch.empty((M,), dtype=torch.float32, device=device)
    if M > 0:
        _launch_forward(x, labels, None, stats, label_logit.data_ptr(), v_start, device)
    return stats, label_logit


def _like_aligned(x):
    """An empty [M, V] tensor whose address is congruent to x's modulo BWD_ALIGN bytes (one RowSpan and
    one lane map fit both)."""
    M, vocab = x.shape
    shift = (x.data_ptr() % BWD_ALIGN) // x.element_size()
    if shift == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    flat = torch.empty(M * vocab + shift, dtype=x.dtype, device=x.device)
    return flat[shift:].view(M, vocab)


def backward_2d(x, labels, stats, grad_output, inplace, device, v_start=0, v_total=None):
    """x [M, V] contiguous; returns the [M, V] gradient (x itself when inplace).

    A vocabulary shard: x holds global columns [v_start, v_start + V) of a v_total-wide vocabulary and
    stats are the combined (whole-row) statistics; the result is this shard's slice of the gradient.
    """
    M, vocab = x.shape
    out = x if inplace else _like_aligned(x)
    if M == 0:
        return out
    if grad_output.dim() == 2:
        g_inner = grad_output.shape[1]
        g_stride0, g_stride1 = grad_output.stride()
    else:
        g_inner, g_stride0, g_stride1 = M, 0, grad_output.stride(0)
    dtype = V.DTYPE_TAG[x.dtype]
    tpr = threads_per_row(vocab, dtype)
    rows = _rows(tpr)
    launch = CE_BACKWARD.launcher(device, dtype, LABEL_TAG[labels.dtype], GRAD_TAG[grad_output.dtype], tpr)
    launch((V.cdiv(M, rows), 1, 1), (tpr * rows, 1, 1),
           (x.data_ptr(), labels.data_ptr(), stats.data_ptr(), grad_output.data_ptr(), out.data_ptr(),
            M, vocab, g_inner, g_stride0, g_stride1, v_start, vocab if v_total is None else v_total))
    return out


def as_rows(logits, labels, M, vocab):
    """[M, V] logits and [M] labels, contiguous (views when already so)."""
    x = logits.reshape(M, vocab)
    if not x.is_contiguous():
        x = x.contiguous()
    lab = labels.reshape(M)
    if not lab.is_contiguous():
        lab = lab.contiguous()
    return x, lab


# ---- the documented plain functions --------------------------------------------------------
def softmax_cross_entropy_forward(logits, labels):
    """Per-token ``logsumexp(logits) - logits[label]`` without materialising fp32 logits.

    ``logits`` [M, V] or [B, S, V] (bf16, fp16, fp32); ``labels`` int64/int32 shaped [M] or
    [B, S]. Returns ``(loss, stats)``: ``loss`` fp32 shaped like ``labels`` (0 where the label
    is negative, NaN where it is >= V); ``stats`` fp32 [M, 2] holding, per row, the maximum
    logit and ``sum(exp(logits - max))`` (so ``lse = max + log(sum)``), as the backward needs.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.softmax_cross_entropy_forward(logits, labels)
    M, vocab = check_inputs(logits, labels)
    device = V.devices(logits=logits, labels=labels)
    x, lab = as_rows(logits, labels, M, vocab)
    return forward_2d(x, lab, labels.shape, device)


def softmax_cross_entropy_backward(logits, labels, stats, grad_output, inplace=False):
    """Gradient of the loss w.r.t. ``logits``: ``grad_output[i] * (softmax(logits_i) - onehot(label_i))``.

    ``stats`` is what :func:`softmax_cross_entropy_forward` returned; ``grad_output`` has the loss's
    shape, any float dtype and any strides (stride 0 included). Rows with a negative label get
    zeros, rows with a label >= V get NaN. With ``inplace=True`` the gradient overwrites
    ``logits`` (which must be contiguous) and ``logits`` itself is returned; otherwise a new
    tensor shaped and typed like ``logits``.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.softmax_cross_entropy_backward(logits, labels, stats, grad_output, inplace)
    inplace = check_inplace_flag(inplace)
    M, vocab = check_inputs(logits, labels, inplace)
    check_backward_inputs(labels.shape, stats, grad_output, M)
    device = V.devices(logits=logits, labels=labels, stats=stats, grad_output=grad_output)
    x, lab = as_rows(logits, labels, M, vocab)
    grad = backward_2d(x, lab, stats, grad_output, inplace, device)
    return logits if inplace else grad.view(logits.shape)


@register_prewarm("cross_entropy")
def _prewarm(preset):
    dtype, vocab = preset["dtype"], preset["vocab"]
    tpr = threads_per_row(vocab, dtype)
    for label in ("i64", "i32"):
        yield CE_FORWARD, dict(DTYPE=dtype, LABEL=label, TPR=tpr)
        yield CE_BACKWARD, dict(DTYPE=dtype, LABEL=label, GDTYPE="f32", TPR=tpr)
