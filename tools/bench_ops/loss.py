"""Softmax cross entropy at the TARGETS.md shape: logits [8192, 157184] bf16, random labels, grad_output = ones.

Also the odd vocabulary 157175 (rows start at every alignment), and the peak memory of one
autograd backward with inplace=False vs inplace=True (printed, and in the case names).
"""
import torch
import torch.nn.functional as F

from benchlib import Case
from linghe.facade.loss import SoftmaxCrossEntropyFunction
from linghe.utils.loss import softmax_cross_entropy_backward as ce_bwd
from linghe.utils.loss import softmax_cross_entropy_forward as ce_fwd

M, VOCAB, ODD_VOCAB = 8192, 157184, 157175
FWD_FLOOR, BWD_FLOOR = 2_575_466_496, 5_150_769_152  # SPEC.md §7.2


def _floors(m, v):
    # The SPEC's per-row allowance (labels, loss, statistics, grad_output) on top of the logits.
    return m * v * 2 + (FWD_FLOOR - M * VOCAB * 2) // M * m, 2 * m * v * 2 + (BWD_FLOOR - 2 * M * VOCAB * 2) // M * m


def _torch_forward(x, y):
    return F.cross_entropy(x.float(), y, reduction="none")


def _torch_backward(x, y, g):
    p = x.float().softmax(-1)
    p[torch.arange(x.shape[0], device=x.device), y] -= 1.0
    return (p * g[:, None]).to(x.dtype)


def backward_peak_bytes(x0, y, inplace):
    """Extra memory one autograd backward allocates at its peak (beyond what is live before it)."""
    x = x0.clone().requires_grad_()
    loss = SoftmaxCrossEntropyFunction.apply(x, y, inplace)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert (x.grad.data_ptr() == x.data_ptr()) == inplace
    del x, loss
    return peak


def cases():
    out = []
    for v in (VOCAB, ODD_VOCAB):
        x = torch.randn(M, v, device="cuda", dtype=torch.bfloat16)
        y = torch.randint(0, v, (M,), device="cuda")
        g = torch.ones(M, device="cuda")
        _, stats = ce_fwd(x, y)
        x_inplace = x.clone()  # overwritten by every in-place run (timing does not depend on the values)
        fwd_floor, bwd_floor = _floors(M, v)
        main = v == VOCAB
        tag = f"logits[{M},{v}] bf16"
        if main:
            gib = 2.0 ** 30
            peak_out, peak_in = backward_peak_bytes(x, y, False), backward_peak_bytes(x, y, True)
            print(f"cross entropy backward peak extra memory, {tag}: inplace=False {peak_out / gib:.3f} GiB, "
                  f"inplace=True {peak_in / gib:.3f} GiB (saves {(peak_out - peak_in) / gib:.3f} GiB)")
            mem_out, mem_in = f" peak +{peak_out / gib:.2f} GiB", f" peak +{peak_in / gib:.3f} GiB"
        else:
            mem_out = mem_in = ""
        out.append(Case("loss", f"SoftmaxCrossEntropy forward {tag}", lambda x=x, y=y: ce_fwd(x, y), fwd_floor,
                        torch_fn=lambda x=x, y=y: _torch_forward(x, y), target_us=628 if main else None))
        out.append(Case("loss", f"SoftmaxCrossEntropy backward {tag}{mem_out}",
                        lambda x=x, y=y, s=stats, g=g: ce_bwd(x, y, s, g, False), bwd_floor,
                        torch_fn=lambda x=x, y=y, g=g: _torch_backward(x, y, g), target_us=1500 if main else None))
        out.append(Case("loss", f"SoftmaxCrossEntropy backward inplace {tag}{mem_in}",
                        lambda x=x_inplace, y=y, s=stats, g=g: ce_bwd(x, y, s, g, True), bwd_floor,
                        target_us=1500 if main else None))
    return out
