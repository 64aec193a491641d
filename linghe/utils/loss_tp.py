"""Vocabulary-parallel softmax cross entropy: the host-side combine across a tensor-parallel group.

Layout (Megatron's vocabulary-parallel one): rank ``r`` of ``tp_group`` holds the logits of global
vocabulary columns ``[r * V_local, (r + 1) * V_local)``, every rank the same ``V_local`` (checked once
per group and ``V_local``), so the global vocabulary is ``V = size * V_local``. Labels are global ids
and, like the number of rows, the same on every rank (assumed, not checked: that would cost a host
sync per call).

Forward, per rank: the shard kernel gives the shard's row max ``m``, ``s = sum(exp(x - m))`` over the
shard and the label's logit where this shard holds it (0 elsewhere); then two collectives::

    M        = all_reduce(m, MAX)
    S, label = all_reduce((s * exp(m - M), label logit), SUM)      # one [rows, 2] collective
    loss     = (M - label) + log(S)     # 0 for a negative label, NaN for a label >= V

and every rank holds the whole loss and the combined stats ``(M, S)``. The backward needs no
communication: each rank's backward kernel turns the combined stats into its slice of the gradient.

Everything here is plain torch on whatever device the tensors live on (the tests run it with gloo
on CPU tensors).
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from . import loss as _loss

# Per process group, the shard widths whose agreement across the ranks was checked.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_group(tp_group) -> None:
    if not (dist.is_available() and isinstance(tp_group, dist.ProcessGroup)):
        raise TypeError(f"tp_group must be a torch.distributed.ProcessGroup or None, got {type(tp_group).__name__}")


def shard_range(tp_group, vocab_local: int) -> tuple[int, int]:
    """(first global column of this rank's shard, global vocabulary size)."""
    return tp_group.rank() * vocab_local, tp_group.size() * vocab_local


def check_same_vocab(tp_group, vocab_local: int, device) -> None:
    """Every rank of ``tp_group`` holds ``vocab_local`` columns (a collective and a host sync, once per
    group and width: all ranks reach it together as long as they call with the same shapes)."""
    done = _CHECKED.setdefault(tp_group, set())
    if vocab_local in done:
        return
    span = torch.tensor([vocab_local, -vocab_local], dtype=torch.int64, device=device)
    dist.all_reduce(span, op=dist.ReduceOp.MAX, group=tp_group)
    widest, narrowest = span.tolist()
    narrowest = -narrowest
    if widest != vocab_local or narrowest != vocab_local:
        raise ValueError(f"logits: every rank of tp_group must hold the same number of vocabulary columns "
                         f"(rank r holds [r * V_local, (r + 1) * V_local)); this rank has {vocab_local}, the "
                         f"group's ranks range over [{narrowest}, {widest}]")
    done.add(vocab_local)


def rescale(stats: torch.Tensor, global_max: torch.Tensor, label_logit: torch.Tensor) -> torch.Tensor:
    """[rows, 2]: this shard's sum of exponentials relative to the global max, and its label logit.
    Summed over the shards, column 0 is the row's ``sum(exp(x - max))``."""
    # A row that is -inf everywhere has s = 0 on every shard: shift by 0, not by -inf (-inf - -inf = NaN).
    shift = global_max.masked_fill(global_max == float("-inf"), 0.0)
    return torch.stack((stats[:, 1] * torch.exp(stats[:, 0] - shift), label_logit), 1)


def finish(global_max: torch.Tensor, summed: torch.Tensor, labels: torch.Tensor, vocab_total: int,
           loss_shape=None):
    """The loss (shaped loss_shape, default [rows]) and combined stats [rows, 2] from the global max and
    the shards' summed :func:`rescale` terms."""
    total, label_logit = summed[:, 0], summed[:, 1]
    loss = (global_max - label_logit) + torch.log(total)  # max - x[label] first, as the kernel does
    if loss_shape is not None:
        loss, labels = loss.reshape(loss_shape), labels.reshape(loss_shape)
    # masked_fill makes a fresh tensor, not a view: autograd lets the caller modify it in place
    loss = loss.masked_fill(labels < 0, 0.0).masked_fill(labels >= vocab_total, float("nan"))
    return loss, torch.stack((global_max, total), 1)


def combine(stats: torch.Tensor, label_logit: torch.Tensor, labels: torch.Tensor, vocab_total: int, tp_group,
            loss_shape=None):
    """Shard stats [rows, 2] and label logits [rows] (as :func:`linghe.utils.loss.forward_shard_2d`
    makes them), labels [rows] -> (loss shaped loss_shape (default [rows]), combined stats [rows, 2]),
    the same on every rank."""
    if stats.shape[0] == 0:  # every rank has no rows (rows agree): nothing to exchange
        return stats.new_empty((0,) if loss_shape is None else loss_shape), stats.new_empty((0, 2))
    global_max = stats[:, 0].clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    summed = rescale(stats, global_max, label_logit)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=tp_group)
    return finish(global_max, summed, labels, vocab_total, loss_shape)


def forward(x, labels, loss_shape, tp_group, device):
    """x [rows, V_local] contiguous shard, labels [rows] global ids (both validated) ->
    (loss shaped loss_shape, combined stats [rows, 2], (v_start, v_total) for the backward)."""
    vocab_local = x.shape[1]
    check_same_vocab(tp_group, vocab_local, device)
    v_start, v_total = shard_range(tp_group, vocab_local)
    stats, label_logit = _loss.forward_shard_2d(x, labels, v_start, device)
    loss, stats = combine(stats, label_logit, labels, v_total, tp_group, loss_shape)
    return loss, stats, (v_start, v_total)
