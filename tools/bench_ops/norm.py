"""RMSNorm + FP8 block quantisation at the TARGETS.md shape: x [8192, 2048] bf16, round_scale=True."""
import torch

from benchlib import Case
from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as rms_quant


def _torch_rms_quant(x, w, mode):
    """What a user would write without linghe (eager PyTorch)."""
    y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float())
    outs = []
    if mode != 1:
        yb = y.view(y.shape[0], -1, 128)
        s = torch.exp2(torch.ceil(torch.log2((yb.abs().amax(-1) / 448).clamp_min(1e-30))))
        outs += [(yb / s[..., None]).to(torch.float8_e4m3fn), s.t().contiguous()]
    if mode != 0:
        yt = y.t().contiguous().view(y.shape[1], -1, 128)
        s = torch.exp2(torch.ceil(torch.log2((yt.abs().amax(-1) / 448).clamp_min(1e-30))))
        outs += [(yt / s[..., None]).to(torch.float8_e4m3fn), s.t().contiguous()]
    return outs


def cases():
    m, n = 8192, 2048
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = []
    for mode, target, floor in ((2, 21, 68_194_304), (0, 16, 50_892_800), (1, 16, 50_892_800)):
        rms = torch.rand(m, device="cuda") + 0.5 if mode == 1 else None
        out.append(Case("norm", f"rms_norm_and_block_quant mode={mode} x[{m},{n}] bf16",
                        lambda mode=mode, rms=rms: rms_quant(x, w, rms=rms, round_scale=True, output_mode=mode),
                        floor, torch_fn=lambda mode=mode: _torch_rms_quant(x, w, mode),
                        target_us=target if mode != 1 else None))
    return out
