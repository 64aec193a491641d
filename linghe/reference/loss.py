"""Reference of the softmax cross entropy (SPEC.md §4.10), in float64.

The SPEC's formulas, extended with this implementation's label rules: a negative label
gives loss 0 and a zero gradient row; a label >= V gives NaN loss and a NaN gradient row.
"""
import torch


def _rows(logits, labels):
    V = logits.shape[-1]
    lf = logits.double().reshape(-1, V)
    lab = labels.reshape(-1).long()
    ignored = lab < 0
    bad = lab >= V
    return lf, lab, ignored, bad, lab.clamp(0, V - 1)


def ref_cross_entropy(logits, labels):
    """Per-token ``logsumexp(logits) - logits[label]`` (float64), shaped like ``labels``."""
    lf, lab, ignored, bad, safe = _rows(logits, labels)
    loss = torch.logsumexp(lf, -1) - lf.gather(1, safe[:, None])[:, 0]
    loss = loss.masked_fill(ignored, 0.0).masked_fill(bad, float("nan"))
    return loss.reshape(labels.shape)


def ref_cross_entropy_grad(logits, labels, grad_loss):
    """``grad_loss[i] * (softmax(logits_i) - onehot(label_i))`` (float64), shaped like ``logits``."""
    lf, lab, ignored, bad, safe = _rows(logits, labels)
    p = lf.softmax(-1)
    rows = torch.arange(p.shape[0], device=p.device)
    p[rows, safe] -= (~(ignored | bad)).double()
    p *= grad_loss.double().reshape(-1, 1)
    p[ignored] = 0.0
    p[bad] = float("nan")
    return p.reshape(logits.shape)


def ref_shard_stats(logits_shard, labels, v_start):
    """One vocabulary-parallel shard (float64): ``logits_shard`` [..., V_local] holds global columns
    ``[v_start, v_start + V_local)``. Returns the shard's stats [M, 2] (row max, ``sum(exp(x - max))``)
    and the label's logit [M] where the shard holds the label, else 0, as the shard kernel makes them.
    The combined loss and the shard's gradient are those of the unsharded op (``ref_cross_entropy``,
    and columns ``[v_start, v_start + V_local)`` of ``ref_cross_entropy_grad``)."""
    V = logits_shard.shape[-1]
    lf = logits_shard.double().reshape(-1, V)
    local = labels.reshape(-1).long() - v_start
    held = (local >= 0) & (local < V)
    mx = lf.max(-1).values
    shift = mx.masked_fill(mx == float("-inf"), 0.0)  # a row of -inf sums to 0, not NaN
    stats = torch.stack((mx, (lf - shift[:, None]).exp().sum(-1)), 1)
    picked = lf.gather(1, local.clamp(0, V - 1)[:, None])[:, 0].masked_fill(~held, 0.0)
    return stats, picked


def ref_shard_grad(logits_shard, labels, stats, grad_loss, v_start, v_total):
    """The shard's gradient (float64, shaped like ``logits_shard``) from the combined stats [M, 2]
    (whole-row max and ``sum(exp(x - max))``): ``grad_loss * (softmax - onehot)`` on global columns
    ``[v_start, v_start + V_local)`` of a ``v_total``-wide vocabulary; zero rows for a negative label,
    NaN rows for a label >= ``v_total``, on every shard."""
    V = logits_shard.shape[-1]
    lf = logits_shard.double().reshape(-1, V)
    lab = labels.reshape(-1).long()
    local = lab - v_start
    held = (local >= 0) & (local < V)
    st = stats.double()
    p = (lf - st[:, :1]).exp() / st[:, 1:]
    p[torch.arange(p.shape[0], device=p.device), local.clamp(0, V - 1)] -= held.double()
    p *= grad_loss.double().reshape(-1, 1)
    p[lab < 0] = 0.0
    p[lab >= v_total] = float("nan")
    return p.reshape(logits_shard.shape)
