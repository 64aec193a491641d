"""References of the MoE permute / unpermute (SPEC.md §4.4, §4.5) and the row-id-map builder."""
import torch

from .quant import FP8


def make_row_id_map(routing_map, multiple_of=1):
    """``routing_map`` [T, E] bool -> (row_id_map [T, E] int32, num_out_tokens).

    Expert-major rows, tokens in increasing order within an expert; each expert's range is
    followed by ``roundup(count, multiple_of) - count`` padding rows."""
    counts = routing_map.sum(0)
    padded = (counts + multiple_of - 1) // multiple_of * multiple_of
    start = torch.cumsum(padded, 0) - padded
    rank = torch.cumsum(routing_map.int(), 0) - 1
    rid = torch.where(routing_map, start[None, :] + rank, torch.full_like(rank, -1))
    return rid.int().contiguous(), int(padded.sum())


def ref_permute(inp, scale, probs, row_id_map, num_out_tokens):
    """(out, permuted_scale, permuted_probs, dst): rows ``dst`` are the routed ones; every other
    row is zero here (compare those per SPEC §4.4's padding table, not against these zeros)."""
    t, e = torch.nonzero(row_id_map >= 0, as_tuple=True)
    dst = row_id_map[t, e].long()
    raw = inp.view(torch.uint8) if inp.dtype == FP8 else inp
    out = raw.new_zeros((num_out_tokens, inp.shape[1]))
    out[dst] = raw[t]
    out = out.view(FP8) if inp.dtype == FP8 else out
    ps = None if scale is None else scale.new_zeros((num_out_tokens,) + tuple(scale.shape[1:]))
    if ps is not None:
        ps[dst] = scale[t]
    pp = None if probs is None else probs.new_zeros(num_out_tokens)
    if pp is not None:
        pp[dst] = probs[t, e]
    return out, ps, pp, dst


def ref_unpermute(grad, row_id_map, probs):
    """(out float64 [T, Hd], restore_probs [T, E] or None)."""
    T, E = row_id_map.shape
    t, e = torch.nonzero(row_id_map >= 0, as_tuple=True)
    src = row_id_map[t, e].long()
    out = torch.zeros(T, grad.shape[1], dtype=torch.float64, device=grad.device)
    out.index_add_(0, t, grad[src].double())
    rp = None if probs is None else probs.new_zeros(T, E)
    if rp is not None:
        rp[t, e] = probs[src]
    return out, rp
