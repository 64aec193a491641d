"""``SoftmaxCrossEntropyFunction`` (SPEC.md §4.10): per-token cross entropy as an autograd Function."""
from __future__ import annotations

import torch

from .. import _validate as V
from ..utils import loss as _loss
from ..utils.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward  # noqa: F401


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """``loss = SoftmaxCrossEntropyFunction.apply(logits, labels, inplace=False)``.

    ``logits`` [M, V] or [B, S, V] (bf16, fp16, fp32), ``labels`` int64/int32 shaped [M] or
    [B, S]. ``loss`` is fp32 shaped like ``labels``: ``logsumexp(logits) - logits[label]`` per
    token, 0 for a negative label, NaN for a label >= V. With ``inplace=True`` the backward
    writes the gradient into the logits' storage and returns that tensor as the gradient (the
    caller's logits are gone afterwards); the logits must then be contiguous.
    """

    @staticmethod
    def forward(ctx, logits, labels, inplace=False):
        inplace = _loss.check_inplace_flag(inplace)
        M, vocab = _loss.check_inputs(logits, labels, inplace)
        device = V.devices(logits=logits, labels=labels)
        x, lab = _loss.as_rows(logits, labels, M, vocab)  # views when contiguous (always so when inplace)
        loss, stats = _loss.forward_2d(x, lab, labels.shape, device)
        ctx.save_for_backward(x, lab, stats)
        ctx.inplace = inplace
        ctx.logits_shape = logits.shape
        ctx.loss_shape = labels.shape
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        x, lab, stats = ctx.saved_tensors
        M = x.shape[0]
        _loss.check_backward_inputs(ctx.loss_shape, stats, grad_output, M)
        device = V.devices(logits=x, grad_output=grad_output)
        grad = _loss.backward_2d(x, lab, stats, grad_output, ctx.inplace, device)
        # A fresh view (its own TensorImpl): autograd can then adopt it as .grad without a copy,
        # so with inplace=True x.grad shares the logits' storage.
        return grad.view(ctx.logits_shape), None, None
