"""Run benchmark cases a few times without timing, for profilers: tools/run_case.py OP SUBSTRING [REPS].

e.g. tools/ncu.sh tools/run_case.py rope backward 2
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import load_cases  # noqa: E402

op, needle = sys.argv[1], sys.argv[2]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 2
cases = [c for c in load_cases([op]) if needle in c.name]
if not cases:
    raise SystemExit(f"no case of {op} matches {needle!r}")
for case in cases:
    for _ in range(reps):
        case.fn()
    torch.cuda.synchronize()
    print("ran", case.name)
