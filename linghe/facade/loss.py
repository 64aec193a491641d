"""``SoftmaxCrossEntropyFunction`` (SPEC.md §4.10): per-token cross entropy as an autograd Function."""
from __future__ import annotations

import torch

from .. import _validate as V
from ..utils import loss as _loss
from ..utils import loss_tp as _tp
from ..utils.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward  # noqa: F401


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """``loss = SoftmaxCrossEntropyFunction.apply(logits, labels, inplace=False, tp_group=None)``.

    ``logits`` [M, V] or [B, S, V] (bf16, fp16, fp32), ``labels`` int64/int32 shaped [M] or
    [B, S]. ``loss`` is fp32 shaped like ``labels``: ``logsumexp(logits) - logits[label]`` per
    token, 0 for a negative label, NaN for a label >= V. With ``inplace=True`` the backward
    writes the gradient into the logits' storage and returns that tensor as the gradient (the
    caller's logits are gone afterwards); the logits must then be contiguous.

    ``tp_group`` (a ``torch.distributed.ProcessGroup``) makes it vocabulary-parallel: ``logits`` is
    this rank's shard, global vocabulary columns ``[r * V_local, (r + 1) * V_local)`` on rank ``r``
    of the group (the same ``V_local`` on every rank), ``labels`` are global ids, the same on every
    rank. The loss is the unsharded op's, on every rank; the gradient is this rank's slice of the
    unsharded gradient. See :mod:`linghe.utils.loss_tp`.
    """

    @staticmethod
    def forward(ctx, logits, labels, inplace=False, tp_group=None):
        inplace = _loss.check_inplace_flag(inplace)
        ctx.compiled = torch.compiler.is_compiling()
        if ctx.compiled:  # traced as the registered operators (linghe/library.py)
            if tp_group is not None:
                raise NotImplementedError("SoftmaxCrossEntropyFunction: tp_group is not supported under "
                                          "torch.compile (the combine calls torch.distributed eagerly)")
            loss, stats = softmax_cross_entropy_forward(logits, labels)
            ctx.save_for_backward(logits, labels, stats)
            return loss
        M, vocab = _loss.check_inputs(logits, labels, inplace)
        if tp_group is not None:
            _tp.check_group(tp_group)
        device = V.devices(logits=logits, labels=labels)
        x, lab = _loss.as_rows(logits, labels, M, vocab)  # views when contiguous (always so when inplace)
        if tp_group is None:
            loss, stats = _loss.forward_2d(x, lab, labels.shape, device)
            ctx.shard = (0, None)
        else:
            loss, stats, ctx.shard = _tp.forward(x, lab, labels.shape, tp_group, device)
        ctx.save_for_backward(x, lab, stats)
        ctx.inplace = inplace
        ctx.logits_shape = logits.shape
        ctx.loss_shape = labels.shape
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # (a flag, not is_compiling(): compiled autograd may trace a backward whose forward ran eagerly,
        # and the two paths save different tensors)
        if ctx.compiled:  # out of place under torch.compile: the graph cannot write a forward input
            logits, labels, stats = ctx.saved_tensors
            return softmax_cross_entropy_backward(logits, labels, stats, grad_output), None, None, None
        x, lab, stats = ctx.saved_tensors
        M = x.shape[0]
        _loss.check_backward_inputs(ctx.loss_shape, stats, grad_output, M)
        device = V.devices(logits=x, grad_output=grad_output)
        grad = _loss.backward_2d(x, lab, stats, grad_output, ctx.inplace, device, *ctx.shard)
        # A fresh view (its own TensorImpl): autograd can then adopt it as .grad without a copy,
        # so with inplace=True x.grad shares the logits' storage.
        return grad.view(ctx.logits_shape), None, None, None
