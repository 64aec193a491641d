"""Benchmark every op against its bandwidth floor and plain PyTorch; write BENCHMARKS.md.

    python tools/bench.py                 # every op in tools/bench_ops, plus the JIT numbers
    python tools/bench.py --ops norm,silu --no-jit --out BENCHMARKS.md

Per case: median µs over many runs (CUDA events, L2 flushed before each run,
wrapper overhead included), the floor (fewest bytes / measured copy bandwidth),
% of floor, and the plain-PyTorch time. Timings are comparable only within one run.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import json
import os
import pkgutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

_flush_buffer = None


def flush_l2():
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    _flush_buffer.fill_(1)


def time_us(fn, reps=50, warmup=5) -> float:
    """Median µs of fn() with L2 flushed before each run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends))


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + written) of a 1 GiB copy."""
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * 4 / (us * 1e-6)


def jit_numbers() -> dict:
    """Cold compile ms per default-preset specialisation, warm first call ms, per-call host µs."""
    from linghe import presets
    from linghe.cache import DiskCache
    from linghe.kernel import _PREWARM
    from linghe.runtime import device_arch

    arch = device_arch(torch.cuda.current_device())
    out = {}
    preset = presets.get(presets.DEFAULT_PRESET)
    # The ops imported by this run's bench modules (all of them in a full run).
    specs = [(k, k.spec(arch, **c)) for fn in _PREWARM.values() for k, c in fn(preset)]
    with tempfile.TemporaryDirectory() as tmp:
        cold = {}
        for kernel, spec in specs:
            entry, compiled = kernel.build(spec, DiskCache(tmp))
            cold.setdefault(kernel.op, []).append(entry.meta["compile_ms"])
        out["cold_compile_ms_median_by_op"] = {op: statistics.median(v) for op, v in sorted(cold.items())}
        out["cold_compile_ms_median"] = statistics.median(v for vs in cold.values() for v in vs)
        out["cold_compile_ms_max"] = max(v for vs in cold.values() for v in vs)
        out["cold_compile_count"] = sum(len(v) for v in cold.values())
        # A new process with the cache just filled: time of its first call (import excluded).
        probe = (
            "import time, torch\n"
            "from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as f\n"
            "x = torch.randn(256, 2048, device='cuda', dtype=torch.bfloat16); w = torch.randn(2048, device='cuda', dtype=torch.bfloat16)\n"
            "torch.cuda.synchronize(); t = time.perf_counter(); f(x, w, round_scale=True, output_mode=2); torch.cuda.synchronize()\n"
            "print((time.perf_counter() - t) * 1000)\n"
        )
        def first_call_ms(cache_dir):
            env = dict(os.environ, LINGHE_CACHE_DIR=cache_dir, PYTHONPATH=os.pathsep.join(sys.path))
            return float(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()[-1])

        warm_first = first_call_ms(tmp)  # the cache the loop above just filled
        with tempfile.TemporaryDirectory() as empty:
            cold_first = first_call_ms(empty)
        out["first_call_ms_cold_cache_new_process"] = cold_first
        out["first_call_ms_warm_cache_new_process"] = warm_first
    # Host time per call at a tiny shape, after the first call.
    from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as f

    x = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, device="cuda", dtype=torch.bfloat16)
    for mode in (0, 2):
        f(x, w, round_scale=True, output_mode=mode)
        torch.cuda.synchronize()
        n = 3000
        t = time.perf_counter()
        for _ in range(n):
            f(x, w, round_scale=True, output_mode=mode)
        out[f"host_us_per_call_mode{mode}"] = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
    # The bare launch of the same kernel, for comparison.
    from linghe.utils.norm import NORM_ROWS

    launch = NORM_ROWS.launcher(x.device, 128, "bf16", "bf16", True)
    bufs = [torch.empty(256, device="cuda") for _ in range(3)]
    args = (x.data_ptr(), w.data_ptr(), *[b.data_ptr() for b in bufs], 1, 1e-6)
    n = 3000
    t = time.perf_counter()
    for _ in range(n):
        launch((1, 1, 1), (256, 1, 1), args)
    out["host_us_per_bare_launch"] = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return out


def load_cases(ops):
    import bench_ops

    names = [m.name for m in pkgutil.iter_modules(bench_ops.__path__)]
    chosen = names if not ops else [n for n in names if n in ops]
    cases = []
    for name in sorted(chosen):
        module = importlib.import_module(f"bench_ops.{name}")
        cases.extend(module.cases())
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", default="", help="comma-separated stems of tools/bench_ops (default: all)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--json", default=None, help="also write raw numbers here")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--no-jit", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="MODULE:NAME=VALUE",
                        help="override a tuning constant before any kernel is built, e.g. "
                             "linghe.utils.norm_gate:BWD_MIN_THREADS=512 (VALUE a Python literal; repeatable)")
    args = parser.parse_args()
    for item in args.set:
        target, _, value = item.partition("=")
        module, _, name = target.partition(":")
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            raise SystemExit(f"--set {item}: {module} has no {name}")
        setattr(mod, name, ast.literal_eval(value))
        print(f"set {module}.{name} = {getattr(mod, name)!r}", flush=True)

    ops = [o for o in args.ops.split(",") if o]
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    rows, raw = [], {"gpu": gpu, "copy_bandwidth_GBps": bw / 1e9, "torch": torch.__version__, "cases": []}
    for case in load_cases(ops):
        try:
            us = time_us(case.fn, reps=args.reps)
            torch_us = time_us(case.torch_fn, reps=max(5, args.reps // 5)) if case.torch_fn else None
        except Exception as error:  # noqa: BLE001 - a failing case is reported, the rest still run
            print(f"{case.op}: {case.name}: FAILED {error!r}", flush=True)
            raw["cases"].append({"op": case.op, "name": case.name, "error": repr(error)})
            continue
        floor = case.floor_bytes / bw * 1e6
        row = {"op": case.op, "name": case.name, "us": us, "floor_us": floor, "pct_floor": 100 * floor / us,
               "torch_us": torch_us, "target_us": case.target_us,
               "tflops": case.flops / (us * 1e-6) / 1e12 if case.flops else None}
        rows.append(row)
        raw["cases"].append(row)
        print(f"{case.op:10s} {case.name:60s} {us:9.1f} us  floor {floor:8.1f}  {row['pct_floor']:5.1f}%  "
              f"torch {torch_us if torch_us is None else round(torch_us, 1)}  target {case.target_us}", flush=True)
        del case
    if not args.no_jit:
        raw["jit"] = jit_numbers()
        print(json.dumps(raw["jit"], indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(raw, handle, indent=1)
    write_markdown(args.out, raw, rows)


def write_markdown(path, raw, rows):
    date = datetime.date.today().isoformat()
    lines = [
        "# Benchmarks", "",
        f"{raw['gpu']}, {date}, torch {raw['torch']}, measured copy bandwidth {raw['copy_bandwidth_GBps']:.0f} GB/s "
        "(bytes read + written). Median µs over 50 runs, L2 flushed before each, wrapper overhead included. "
        "Floor = fewest bytes / copy bandwidth. Targets are TARGETS.md's (H200). Compare only numbers of one run.",
        "", "| op | case | µs | floor µs | % of floor | plain PyTorch µs | target µs (H200) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        torch_us = f"{r['torch_us']:.1f}" if r["torch_us"] is not None else "—"
        target = f"{r['target_us']:g}" if r["target_us"] else "—"
        extra = f" ({r['tflops']:.0f} TFLOP/s)" if r.get("tflops") else ""
        lines.append(f"| {r['op']} | {r['name']}{extra} | {r['us']:.1f} | {r['floor_us']:.1f} | {r['pct_floor']:.0f}% | "
                     f"{torch_us} | {target} |")
    failed = [c for c in raw["cases"] if "error" in c]
    for c in failed:
        lines.append(f"| {c['op']} | {c['name']} | failed: {c['error'][:80]} | | | | |")
    if "jit" in raw:
        j = raw["jit"]
        lines += ["", "## JIT", "",
                  f"- cold compile (NVRTC, empty cache) of the {j['cold_compile_count']} default-preset specialisations: "
                  f"median {j['cold_compile_ms_median']:.0f} ms, max {j['cold_compile_ms_max']:.0f} ms "
                  f"(per op: {', '.join(f'{k} {v:.0f}' for k, v in j['cold_compile_ms_median_by_op'].items())})",
                  f"- first call in a new process, warm disk cache: {j['first_call_ms_warm_cache_new_process']:.1f} ms "
                  f"(cold cache: {j['first_call_ms_cold_cache_new_process']:.1f} ms)",
                  f"- host time per call once compiled, x [1, 128]: mode 0 {j['host_us_per_call_mode0']:.1f} µs, "
                  f"mode 2 {j['host_us_per_call_mode2']:.1f} µs (bare cuLaunchKernel of the same kernel: "
                  f"{j['host_us_per_bare_launch']:.1f} µs)"]
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
