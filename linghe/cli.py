"""``linghe`` command line: prewarm the kernel cache, print kernel source, manage the cache.

    linghe prewarm --preset moe-2048 --arch sm_90a      # every kernel a training step launches
    linghe prewarm --arch sm_90a --op rms_norm_block_quant N=4096 DTYPE=bf16 WDTYPE=bf16 OUTPUT_MODE=2 ROUND_SCALE=true
    linghe source rms_norm_block_quant N=2048 DTYPE=bf16 WDTYPE=bf16 OUTPUT_MODE=2 ROUND_SCALE=true
    linghe cache path | list | stats | clear
    linghe ops                                           # every op and its compile-time parameters
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import config, presets


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _parse_constants(pairs: list[str]) -> dict:
    constants = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"linghe: expected NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        constants[name] = _parse_value(value)
    return constants


def _local_arch() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            from .runtime import device_arch

            return device_arch(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - any failure means: no usable local GPU
        pass
    raise SystemExit("linghe: no CUDA GPU here to take the architecture from; pass --arch (e.g. --arch sm_90a)")


def _kernel(op: str):
    from .kernel import REGISTRY, load_all_ops

    load_all_ops()
    if op not in REGISTRY:
        raise SystemExit(f"linghe: unknown op {op!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[op]


def _build_one(job):
    """Worker: compile (or find) one spec. Runs in a child process."""
    op, constants, arch, root = job
    from .cache import DiskCache

    kernel = _kernel(op)
    spec = kernel.spec(arch, **constants)
    start = time.perf_counter()
    try:
        _, compiled = kernel.build(spec, DiskCache(root))
        return spec.describe(), "compiled" if compiled else "cached", time.perf_counter() - start, ""
    except Exception as error:  # noqa: BLE001 - reported in the summary
        return spec.describe(), "failed", time.perf_counter() - start, str(error)


def _progress(done: int, total: int, label: str) -> None:
    if sys.stderr.isatty():
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:60]:<60}")
        sys.stderr.flush()
        if done == total:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(f"[{done}/{total}] {label}\n")


def cmd_prewarm(args) -> int:
    from .cache import default_cache
    from .kernel import prewarm_specs

    arch = args.arch or _local_arch()
    if args.op:
        kernel = _kernel(args.op)
        jobs = [(kernel.op, kernel.spec(arch, **_parse_constants(args.constants)).params, arch)]
    else:
        preset = presets.get(args.preset or presets.DEFAULT_PRESET)
        jobs = [(k.op, s.params, arch) for k, s in prewarm_specs(preset, arch)]
    root = str(default_cache().root)
    work = [(op, constants, a, root) for op, constants, a in jobs]
    workers = max(1, min(args.jobs or os.cpu_count() or 1, len(work)))
    start = time.perf_counter()
    results = []
    if workers == 1:
        for job in work:
            results.append(_build_one(job))
            _progress(len(results), len(work), results[-1][0])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
            for future in as_completed([pool.submit(_build_one, job) for job in work]):
                results.append(future.result())
                _progress(len(results), len(work), results[-1][0])
    counts = {k: sum(1 for r in results if r[1] == k) for k in ("compiled", "cached", "failed")}
    for name, status, _, error in results:
        if status == "failed":
            print(f"FAILED {name}: {error}", file=sys.stderr)
    print(f"linghe prewarm: {len(results)} kernels for {arch} in {time.perf_counter() - start:.1f} s with "
          f"{workers} processes: {counts['compiled']} compiled, {counts['cached']} already cached, "
          f"{counts['failed']} failed (cache: {root})")
    return 1 if counts["failed"] else 0


def cmd_source(args) -> int:
    kernel = _kernel(args.op)
    constants = _parse_constants(args.constants)
    try:
        spec = kernel.spec(args.arch, **constants)
    except TypeError as error:
        raise SystemExit(f"linghe: {error}") from None
    sys.stdout.write(kernel.render(spec))
    return 0


def cmd_ops(args) -> int:
    from .kernel import REGISTRY, load_all_ops

    load_all_ops()
    for op in sorted(REGISTRY):
        kernel = REGISTRY[op]
        print(f"{op:32s} template={kernel.template:24s} params: {' '.join(kernel.params)}")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def cmd_cache(args) -> int:
    from .cache import default_cache

    disk = default_cache()
    if args.action == "path":
        print(disk.root)
    elif args.action == "list":
        now = time.time()
        print(f"{'op':28s} {'arch':8s} {'size':>8s} {'age':>5s}  constants")
        for e in sorted(disk.entries(), key=lambda e: (e.get("op", ""), str(e.get("constants")))):
            consts = " ".join(f"{k}={v}" for k, v in (e.get("constants") or {}).items())
            print(f"{e.get('op', '?'):28s} {e.get('arch', '?'):8s} {e['disk_bytes'] / 1024:7.0f}K "
                  f"{_age(now - e.get('created', now)):>5s}  {consts}")
    elif args.action == "stats":
        entries = disk.entries()
        total = sum(e["disk_bytes"] for e in entries)
        ops = len({e.get("op") for e in entries})
        print(f"cache: {disk.root}\nentries: {len(entries)} ({ops} ops)\nsize: {total / 2**20:.1f} MiB of "
              f"{config.cache_max_bytes() / 2**20:.0f} MiB bound (LINGHE_CACHE_MAX_MB)")
    elif args.action == "clear":
        print(f"removed {disk.clear()} entries from {disk.root}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linghe", description="linghe: JIT-compiled fused kernels for LLM training")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prewarm", help="compile specialisations into the disk cache (no GPU needed with --arch)")
    p.add_argument("--preset", help=f"model preset ({', '.join(sorted(presets.PRESETS))}; default {presets.DEFAULT_PRESET})")
    p.add_argument("--op", help="one op instead of a preset; give its constants as NAME=VALUE")
    p.add_argument("--arch", help="target, e.g. sm_90a (default: the local GPU)")
    p.add_argument("--jobs", type=int, help="parallel compile processes (default: all cores)")
    p.add_argument("constants", nargs="*", help="NAME=VALUE constants with --op")
    p.set_defaults(func=cmd_prewarm)

    p = sub.add_parser("source", help="print the rendered CUDA source of one specialisation")
    p.add_argument("op")
    p.add_argument("constants", nargs="*", help="NAME=VALUE")
    p.add_argument("--arch", default="sm_90a")
    p.set_defaults(func=cmd_source)

    p = sub.add_parser("ops", help="list ops and their compile-time parameters")
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("cache", help="show or clear the disk cache")
    p.add_argument("action", choices=("path", "list", "stats", "clear"))
    p.set_defaults(func=cmd_cache)

    args = parser.parse_args(argv)
    if args.command == "prewarm" and args.op and args.preset:
        parser.error("give --preset or --op, not both")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
