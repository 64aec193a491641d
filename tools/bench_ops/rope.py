"""QK-norm + half RoPE at the TARGETS.md shape: qkv [4096, 2, 3072] bf16, H=16, h=4, D=128, duplicated freqs."""
import torch

from benchlib import Case
from linghe.utils.rope import qk_norm_half_rope_backward, qk_norm_half_rope_forward

S, B, H, h, D = 4096, 2, 16, 4, 128
FWD_BYTES, BWD_BYTES = 101_712_384, 152_044_544  # SPEC.md §7.2


def _torch_forward(qkv, qw, kw, freqs, eps=1e-6):
    """What a user would write without linghe (eager PyTorch, fp32 math)."""
    w = H // h
    t = qkv.view(S, B, h, w + 2, D)
    c, s = freqs.cos()[:, None, None, :], freqs.sin()[:, None, None, :]

    def norm_rope(u, weight):
        u = u.float()
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        a, rest = u[..., :D // 2], u[..., D // 2:]
        rot = torch.cat([-a[..., D // 4:], a[..., :D // 4]], -1)
        return torch.cat([a * c + rot * s, rest], -1).to(qkv.dtype)

    q = norm_rope(t[:, :, :, :w].reshape(S, B, H, D), qw)
    k = norm_rope(t[:, :, :, w], kw)
    return (q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(),
            t[:, :, :, w + 1].transpose(0, 1).contiguous())


def cases():
    dim = (H + 2 * h) * D
    qkv = torch.randn(S, B, dim, device="cuda", dtype=torch.bfloat16)
    qw = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16)
    kw = (1 + 0.1 * torch.randn(D, device="cuda")).to(torch.bfloat16)
    inv = 10000.0 ** (-torch.arange(D // 4, device="cuda", dtype=torch.float64) * 2 / (D // 2))
    f = torch.arange(S, device="cuda", dtype=torch.float64)[:, None] * inv
    freqs = torch.cat([f, f], 1).float()
    gq = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    gk = torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)
    gv = torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16)

    # Plain-PyTorch backward: autograd through the eager forward, graph kept for repeated runs.
    leaves = [t.detach().clone().requires_grad_(True) for t in (qkv, qw, kw)]
    outs = _torch_forward(*leaves, freqs)

    def torch_backward():
        return torch.autograd.grad(outs, leaves, (gq, gk, gv), retain_graph=True)

    shape = f"qkv[{S},{B},{dim}] bf16 H={H} h={h}"
    return [
        Case("rope", f"qk_norm_half_rope forward {shape}",
             lambda: qk_norm_half_rope_forward(qkv, qw, kw, freqs, H, h), FWD_BYTES,
             torch_fn=lambda: _torch_forward(qkv, qw, kw, freqs), target_us=31),
        Case("rope", f"qk_norm_half_rope backward {shape}",
             lambda: qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, freqs, H, h), BWD_BYTES,
             torch_fn=torch_backward, target_us=48),
    ]
