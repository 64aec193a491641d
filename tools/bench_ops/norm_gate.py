"""GroupNormGate at the TARGETS.md shape: x [2, 4096, 2048], gate [4096, 2, 2048] bf16, group_size (G) 4."""
import torch

from benchlib import Case
from linghe.utils.norm_gate import group_norm_gate_backward, group_norm_gate_forward

B, S, DIM, G = 2, 4096, 2048, 4
FWD_BYTES = 100_667_392    # SPEC.md §7.2: x, gate in, out out (bf16) + weight
BWD_BYTES = 167_780_352    # grad, x, gate in; dx, dgate out (bf16) + weight in, dweight out


def _torch_forward(x, gate, w, eps=1e-6):
    """What a user would write without linghe (eager PyTorch, fp32 math)."""
    xg = x.float().view(B, S, G, DIM // G)
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).view(B, S, DIM) * w.float()
    return (y.transpose(0, 1) * torch.sigmoid(gate.float())).to(x.dtype)


def _torch_backward(grad, x, gate, w, eps=1e-6):
    """SPEC.md §4.13's gradient formulas in eager PyTorch (fp32 math)."""
    d = DIM // G
    xg = x.float().view(B, S, G, d)
    r = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    sg = torch.sigmoid(gate.float()).transpose(0, 1).reshape(B, S, G, d)
    gh = grad.float().transpose(0, 1).reshape(B, S, G, d) * sg
    wg = w.float().view(G, d)
    dx = r * wg * gh - (r ** 3 / d) * xg * (xg * wg * gh).sum(-1, keepdim=True)
    dgate = (gh * (1 - sg) * xg * r * wg).reshape(B, S, DIM).transpose(0, 1).to(gate.dtype)
    dw = (xg * r * gh).sum((0, 1)).reshape(DIM).to(w.dtype)
    return dx.reshape(B, S, DIM).to(x.dtype), dgate, dw


def cases():
    x = torch.randn(B, S, DIM, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(S, B, DIM, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(DIM, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(S, B, DIM, device="cuda", dtype=torch.bfloat16)
    shape = f"x[{B},{S},{DIM}] gate[{S},{B},{DIM}] G={G} bf16"
    return [
        Case("norm_gate", f"GroupNormGate forward {shape}", lambda: group_norm_gate_forward(x, gate, w, 1e-6, G),
             FWD_BYTES, torch_fn=lambda: _torch_forward(x, gate, w), target_us=31),
        Case("norm_gate", f"GroupNormGate backward {shape}",
             lambda: group_norm_gate_backward(grad, x, gate, w, 1e-6, G),
             BWD_BYTES, torch_fn=lambda: _torch_backward(grad, x, gate, w), target_us=52),
    ]
