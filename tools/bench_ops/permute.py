"""MoE permute / unpermute at the TARGETS.md shape: 8192 tokens x 2048 bf16, 256 experts, exact top-8.

(a) permute, contiguous map, scale [T] fp32, probs [T, 256] fp32 (the target case);
(b) permute, 16-padded map, contiguous=False, tokens_per_expert, no scale (the "padded indices" variant);
fp8 rows with block scales (no target); unpermute of grad [65536, 2048] bf16 with probs [65536] fp32.
"""
import torch

from benchlib import Case
from linghe.reference.permute import make_row_id_map
from linghe.utils.gather import triton_permute_with_mask_map as permute
from linghe.utils.scatter import triton_unpermute_with_mask_map as unpermute

T, H, E, K = 8192, 2048, 256, 8


def _torch_permute(inp, scale, probs, rid, n):
    """What a user would write without linghe (eager PyTorch; nonzero syncs)."""
    t, e = torch.nonzero(rid >= 0, as_tuple=True)
    dst = rid[t, e].long()
    out = inp.new_zeros((n, inp.shape[1]))
    out[dst] = inp[t]
    ps = None
    if scale is not None:
        ps = scale.new_zeros((n,) + tuple(scale.shape[1:]))
        ps[dst] = scale[t]
    pp = probs.new_zeros(n)
    pp[dst] = probs[t, e]
    return out, ps, pp


def _torch_unpermute(grad, rid, probs):
    t, e = torch.nonzero(rid >= 0, as_tuple=True)
    src = rid[t, e].long()
    out = torch.zeros(rid.shape[0], grad.shape[1], dtype=torch.float32, device=grad.device)
    out.index_add_(0, t, grad[src].float())
    rp = probs.new_zeros(rid.shape)
    rp[t, e] = probs[src]
    return out.to(grad.dtype), rp


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(T, E, device="cuda", generator=g)
    routing = torch.zeros(T, E, dtype=torch.bool, device="cuda")
    routing.scatter_(1, logits.topk(K, dim=1).indices, True)  # exact top-8: 65,536 routed rows
    probs = torch.softmax(logits, -1)
    rid, n = make_row_id_map(routing)
    rid16, n16 = make_row_id_map(routing, 16)
    tpe = routing.sum(0).int()
    inp = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    scale = torch.rand(T, device="cuda", generator=g) + 0.5
    q = (torch.randn(T, H, device="cuda", generator=g) * 50).to(torch.float8_e4m3fn)
    qscale = torch.rand(T, H // 128, device="cuda", generator=g) + 0.5
    grad = torch.randn(n, H, device="cuda", generator=g).to(torch.bfloat16)
    gprobs = torch.rand(n, device="cuda", generator=g)

    map_bytes, probs_bytes = T * E * 4, T * E * 4
    floor_a = T * H * 2 + T * 4 + map_bytes + probs_bytes + n * H * 2 + n * 4 + n * 4  # 319,324,160
    floor_b = T * H * 2 + map_bytes + probs_bytes + n16 * H * 2 + n16 * 4               # ~326.9 MB
    floor_q = T * H + T * (H // 128) * 4 + map_bytes + probs_bytes + n * H + n * (H // 128) * 4 + n * 4
    floor_u = n * H * 2 + map_bytes + n * 4 + T * H * 2 + T * E * 4                     # 319,029,248
    return [
        Case("permute", f"permute_with_mask_map (a) contiguous [{T},{H}] bf16 E={E} top{K} scale+probs",
             lambda: permute(inp, scale, probs, rid, n), floor_a,
             torch_fn=lambda: _torch_permute(inp, scale, probs, rid, n), target_us=95),
        Case("permute", f"permute_with_mask_map (b) padded-16 [{T},{H}] bf16 E={E} top{K} probs, {n16} rows",
             lambda: permute(inp, None, probs, rid16, n16, False, tpe), floor_b,
             torch_fn=lambda: _torch_permute(inp, None, probs, rid16, n16)),
        Case("permute", f"permute_with_mask_map contiguous [{T},{H}] fp8 + block scales E={E} top{K}",
             lambda: permute(q, qscale, probs, rid, n), floor_q,
             torch_fn=lambda: _torch_permute(q.view(torch.uint8), qscale, probs, rid, n)),
        Case("permute", f"unpermute_with_mask_map grad [{n},{H}] bf16 E={E} top{K} probs",
             lambda: unpermute(grad, rid, gprobs), floor_u,
             torch_fn=lambda: _torch_unpermute(grad, rid, gprobs), target_us=95),
    ]
