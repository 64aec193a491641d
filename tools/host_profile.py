"""Host time of one op call (no GPU sync inside the loop) and where it goes (cProfile).

tools/host_profile.py OP SUBSTRING [CALLS]   e.g. tools/host_profile.py fp32_gemm "hi+lo" 200
Uses the benchmark cases (tools/bench_ops); prints µs per call and the top functions by own time.
"""
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load_cases  # noqa: E402

op, needle = sys.argv[1], sys.argv[2]
calls = int(sys.argv[3]) if len(sys.argv) > 3 else 200
case = next(c for c in load_cases([op]) if needle in c.name)
for _ in range(5):
    case.fn()
torch.cuda.synchronize()
times = []
for _ in range(calls):
    t = time.perf_counter()
    case.fn()
    times.append(time.perf_counter() - t)
    torch.cuda.synchronize()   # keep the queue empty: the host time of one call, not of a backlog
times.sort()
print(f"{case.name}: host µs per call median {times[len(times) // 2] * 1e6:.1f}, "
      f"p90 {times[int(len(times) * 0.9)] * 1e6:.1f}")
prof = cProfile.Profile()
prof.enable()
for _ in range(calls):
    case.fn()
    torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(12)
