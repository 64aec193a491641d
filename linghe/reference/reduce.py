"""References of the batched reductions (SPEC.md §4.11, §4.12), in float64 / exact integers."""
import torch


def _device(xs):
    return xs[0].device if len(xs) else torch.device("cpu")


def ref_batch_sum_with_ord(xs, ord=2):
    """``Σ_tensors Σ_elements |x|^ord`` as a 0-d fp32 tensor (accumulated in fp64; no root)."""
    total = torch.zeros((), dtype=torch.float64, device=_device(xs))
    for x in xs:
        total = total + x.double().abs().pow(ord).sum()
    return total.float()


_SAME_BITS_SIGNED = {getattr(torch, u): getattr(torch, i) for u, i in
                     (("uint16", "int16"), ("uint32", "int32"), ("uint64", "int64")) if hasattr(torch, u)}


def _is_zero(x):
    """``x == 0`` for every dtype, including those torch compares poorly (fp8, wide unsigned)."""
    if x.dtype in _SAME_BITS_SIGNED:
        return x.view(_SAME_BITS_SIGNED[x.dtype]) == 0  # zero has the same bits either way
    if x.is_floating_point() and x.element_size() == 1:
        return x.float() == 0  # fp8 -> fp32 is exact
    return x == 0


def ref_batch_count_zero(xs):
    """The number of elements ``== 0`` across ``xs`` (+0 and -0 count, NaN does not), 0-d int64."""
    total = torch.zeros((), dtype=torch.int64, device=_device(xs))
    for x in xs:
        total = total + _is_zero(x).sum()
    return total
