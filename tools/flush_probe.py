"""Does the benchmark's L2 flush (256 MiB written) itself cost the timed op time?

    python3 tools/flush_probe.py [OPS] [NEEDLES]   e.g. tools/flush_probe.py copy,norm,rope "mode,forward"

Times the chosen bench cases twice in the same process, alternating: after bench.py's flush (a fill
that leaves L2 full of dirty lines, as triton.testing.do_bench's zero_() does), and after the same
fill followed by a read of the whole 256 MiB buffer (L2 left holding clean lines, which need no
write-back when the op evicts them). The difference is what the dirty write-back adds to each op.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ops = sys.argv[1].split(",") if len(sys.argv) > 1 else ["copy", "norm", "rope"]
needles = sys.argv[2].split(",") if len(sys.argv) > 2 else [""]
fill_flush = bench.flush_l2


def fill_read_flush():
    fill_flush()
    bench._flush_buffer.amax()  # reads 256 MiB: the fill's dirty lines are written back and replaced


cases = [c for c in bench.load_cases(ops) if any(n in c.name for n in needles)]
print(f"{torch.cuda.get_device_name()}: median µs, fill flush / fill + read flush, 3 alternating rounds")
for case in cases:
    times = {"fill": [], "fill+read": []}
    for _ in range(3):
        for label, flush in (("fill", fill_flush), ("fill+read", fill_read_flush)):
            bench.flush_l2 = flush
            times[label].append(bench.time_us(case.fn, reps=40))
    bench.flush_l2 = fill_flush
    print(f"{case.op:6s} {case.name:58s} " + "  ".join(
        f"{k} " + "/".join(f"{t:.1f}" for t in v) for k, v in times.items()), flush=True)
