"""Reference of QK RMSNorm + half RoPE (SPEC.md §4.2), in float64; the backward through autograd."""
import torch


def ref_qk_norm_half_rope(qkv, qw, kw, freqs, H, h, eps=1e-6):
    """(q [B,S,H,D], k [B,S,h,D], v [B,S,h,D]) in float64, as views (not contiguous)."""
    S, B, Dim = qkv.shape
    D = Dim // (H + 2 * h)
    g = H // h
    t = qkv.double().reshape(S, B, h, g + 2, D)
    q = t[:, :, :, :g].reshape(S, B, H, D)
    k, v = t[:, :, :, g], t[:, :, :, g + 1]
    c, s = freqs.double().cos()[:, None, None, :], freqs.double().sin()[:, None, None, :]

    def norm_rope(u, w):
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps) * w.double()
        a, rest = u[..., : D // 2], u[..., D // 2:]
        rot = torch.cat([-a[..., D // 4:], a[..., : D // 4]], -1)
        return torch.cat([a * c + rot * s, rest], -1)

    return tuple(o.transpose(0, 1) for o in (norm_rope(q, qw), norm_rope(k, kw), v))


def ref_qk_norm_half_rope_backward(grad_q, grad_k, grad_v, qkv, qw, kw, freqs, H, h, eps=1e-6):
    """(dqkv [S,B,Dim], d_q_norm_weight [D], d_k_norm_weight [D]) in float64, by autograd of the reference."""
    with torch.enable_grad():
        x = qkv.detach().double().requires_grad_(True)
        wq = qw.detach().double().requires_grad_(True)
        wk = kw.detach().double().requires_grad_(True)
        outs = ref_qk_norm_half_rope(x, wq, wk, freqs, H, h, eps)
        grads = torch.autograd.grad(outs, (x, wq, wk), (grad_q.double(), grad_k.double(), grad_v.double()))
    return grads
