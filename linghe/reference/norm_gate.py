"""Reference of GroupNormGate (SPEC.md §4.13), in float64; the backward through autograd."""
import torch


def ref_group_norm_gate(x, gate, weight, eps=1e-6, group_size=4):
    """out [S, B, dim] (float64) = grouped RMSNorm(x [B, S, dim]) * weight * sigmoid(gate [S, B, dim]).

    ``group_size`` is the number of groups G per token, each of dim/G contiguous channels.
    """
    S, B, D = gate.shape
    d = D // group_size
    xg = x.double().reshape(B, S, group_size, d)
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).reshape(B, S, D) * weight.double()
    return y.transpose(0, 1) * torch.sigmoid(gate.double())


def ref_group_norm_gate_backward(grad, x, gate, weight, eps=1e-6, group_size=4):
    """(dx, dgate, dweight) in float64: autograd of :func:`ref_group_norm_gate` for output gradient ``grad``."""
    xd = x.detach().double().requires_grad_(True)
    gd = gate.detach().double().requires_grad_(True)
    wd = weight.detach().double().requires_grad_(True)
    with torch.enable_grad():
        out = ref_group_norm_gate(xd, gd, wd, eps, group_size)
        return torch.autograd.grad(out, (xd, gd, wd), grad.double())
