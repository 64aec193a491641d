"""Where the host time of one op call goes (cProfile over many calls at a tiny shape)."""
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, ".")
from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as f  # noqa: E402

if len(sys.argv) > 1 and sys.argv[1] == "big":  # one call per mode at the benchmark shape (for ncu)
    xb = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    for mode in (0, 2, 1):
        f(xb, wb, rms=torch.rand(8192, device="cuda") + 0.5 if mode == 1 else None, round_scale=True, output_mode=mode)
    torch.cuda.synchronize()
    sys.exit(0)
x = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
w = torch.randn(128, device="cuda", dtype=torch.bfloat16)
f(x, w, round_scale=True, output_mode=0)
torch.cuda.synchronize()
for label, fn in [("torch.empty x5", lambda: [torch.empty((1, 128), dtype=torch.float8_e4m3fn, device=x.device) for _ in range(5)]),
                  ("op mode 0", lambda: f(x, w, round_scale=True, output_mode=0))]:
    t = time.perf_counter()
    for _ in range(2000):
        fn()
    print(f"{label}: {(time.perf_counter() - t) / 2000 * 1e6:.1f} us/call")
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    f(x, w, round_scale=True, output_mode=0)
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
