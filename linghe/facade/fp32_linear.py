"""``FusedFp32GEMM`` (SPEC.md §4.3): the router GEMM with fp32 logits as an autograd Function.

The kernels and the plain functions (usable without autograd) live in :mod:`linghe.utils.fp32_gemm`.
"""
from __future__ import annotations

import torch

from ..utils import fp32_gemm as _gemm
from ..utils.fp32_gemm import fp32_gemm_backward, fp32_gemm_forward  # noqa: F401


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
                                  need_weight_grad=need_weight, split=_gemm.SPLIT_GRAD_OUTPUT)
