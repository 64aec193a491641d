"""Reference of RMSNorm + FP8 block quantisation (SPEC.md §4.1)."""
import torch

from .quant import quant_cols, quant_rows


def ref_rms_norm_and_block_quant_forward(x, weight, eps=1e-6, rms=None, round_scale=False, output_mode=2):
    """Returns (q, s, rms, qt, st); entries a mode does not produce are None."""
    xd = x.double()
    rinv = torch.rsqrt(xd.pow(2).mean(-1) + eps) if rms is None else rms.double()
    y = (xd * rinv[:, None] * weight.double()).float()
    q = s = qt = st = None
    if output_mode in (0, 2):
        q, s = quant_rows(y, round_scale)
    if output_mode in (1, 2):
        qt, st = quant_cols(y, round_scale)
    return q, s, rinv.float(), qt, st
