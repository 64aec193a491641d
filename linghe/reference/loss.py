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
