"""``GroupNormGateFunction`` (SPEC.md §4.13): the output stage of linear attention as an autograd Function.

Forward and backward are the plain functions of :mod:`linghe.utils.norm_gate`
(``group_norm_gate_forward`` / ``group_norm_gate_backward``), callable without autograd.
"""
from __future__ import annotations

import torch

from ..utils.norm_gate import _forward, group_norm_gate_backward


class GroupNormGateFunction(torch.autograd.Function):
    """``out = GroupNormGateFunction.apply(x, gate, weight, eps=1e-6, group_size=4)``.

    ``x`` [B, S, dim] (or [B, S, heads, head_dim]), ``gate`` [S, B, dim], ``weight`` [dim];
    ``group_size`` is the number of groups per token. ``out`` is [S, B, dim] in x's dtype. The
    backward returns ``(dx, dgate, dweight, None, None)``; dweight is summed in fp32 in a fixed
    order and returned in weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, gate, weight, eps=1e-6, group_size=4):
        out, xc, gc, wc = _forward(x, gate, weight, eps, group_size)
        # Save the tensors as the kernel read them (contiguous): the backward need not copy again.
        ctx.save_for_backward(xc, gc, wc)
        ctx.eps, ctx.group_size = eps, group_size
        return out

    @staticmethod
    def backward(ctx, grad):
        x, gate, weight = ctx.saved_tensors
        dx, dgate, dweight = group_norm_gate_backward(grad, x, gate, weight, ctx.eps, ctx.group_size)
        return dx, dgate, dweight, None, None
