"""QK RMSNorm + half RoPE as an autograd Function (SPEC.md §4.2)."""
from __future__ import annotations

import torch

from ..utils.rope import qk_norm_half_rope_backward, qk_norm_half_rope_forward


class QkNormHalfRopeFunction(torch.autograd.Function):
    """``q, k, v = QkNormHalfRopeFunction.apply(qkv, q_norm_weight, k_norm_weight, freqs, H=32, h=4, eps=1e-6)``.

    ``qkv`` [S, B, (H+2h)*D] holds interleaved GQA groups (W = H/h query heads, then one key and one
    value head per group). q and k heads are RMS-normalised with their weight [D] and their first D/2
    lanes rotated by ``freqs`` [S, D/2] (fp32 angles); v is copied. Returns contiguous q [B, S, H, D],
    k and v [B, S, h, D]. The backward returns ``(dqkv, d_q_norm_weight, d_k_norm_weight, None, None,
    None, None)``: dqkv contiguous in the grads' dtype, weight grads summed in fp32 (deterministic)
    and returned in each weight's dtype.
    """

    @staticmethod
    def forward(ctx, qkv, q_norm_weight, k_norm_weight, freqs, H=32, h=4, eps=1e-6):
        q, k, v = qk_norm_half_rope_forward(qkv, q_norm_weight, k_norm_weight, freqs, H, h, eps)
        ctx.save_for_backward(qkv, q_norm_weight, k_norm_weight, freqs)
        ctx.heads = (H, h, eps)
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        qkv, q_norm_weight, k_norm_weight, freqs = ctx.saved_tensors
        H, h, eps = ctx.heads
        dqkv, dqw, dkw = qk_norm_half_rope_backward(grad_q, grad_k, grad_v, qkv, q_norm_weight, k_norm_weight,
                                                    freqs, H, h, eps)
        return dqkv, dqw, dkw, None, None, None, None
