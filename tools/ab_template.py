"""A/B of kernel-template variants inside one process, on the same buffers.

    python tools/ab_template.py --ops rope --match forward --rounds 30 fast=/tmp/v1/linghe/templates ...

Each variant is LABEL=FOLDER: a folder holding edited copies of some ``*.cu.j2`` templates (e.g. the
templates folder of an edited copy of the tree). Every template there that differs from the package's
is copied beside it as ``<stem>__<LABEL>.cu.j2`` for the run (and removed after), and the kernels
built from it are loaded a second time from the copy. The rounds then alternate the variants call
block by call block, swapping which loaded kernels the ops launch, so every variant times the same
inputs at the same addresses: differences of ~0.1 µs show, where fresh processes (tools/ab.sh)
scatter by ~0.4. Headers (``*.cuh``) are shared: a variant changes templates only.

Per case it prints each variant's median over the rounds and the median of its paired differences
against the baseline (the package's templates), and whether its outputs equal the baseline's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (tools/ on the path first)
from linghe import compiler  # noqa: E402
from linghe.kernel import REGISTRY  # noqa: E402

BASE = "base"


def _install(label: str, folder: Path) -> dict[str, str]:
    """Copy the variant's changed templates beside the package's; {template: variant name}."""
    renamed = {}
    for path in sorted(folder.glob("*.cu.j2")):
        own = compiler.TEMPLATE_DIR / path.name
        if not own.exists() or own.read_text() == path.read_text():
            continue
        name = f"{path.name[:-len('.cu.j2')]}__{label}.cu.j2"
        (compiler.TEMPLATE_DIR / name).write_text(path.read_text())
        renamed[path.name] = name
    return renamed


def _outputs(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _outputs(item)]
    return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", required=True, help="comma-separated stems of tools/bench_ops")
    parser.add_argument("--match", default="", help="only cases whose name contains this")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=30, help="runs per timing (median), L2 flushed before each")
    parser.add_argument("variants", nargs="+", metavar="LABEL=FOLDER")
    args = parser.parse_args()

    cases = [c for c in bench.load_cases(args.ops.split(",")) if args.match in c.name]
    if not cases:
        raise SystemExit(f"no case of {args.ops} matches {args.match!r}")
    variants = {BASE: {}}
    copied = []
    try:
        for item in args.variants:
            label, _, folder = item.partition("=")
            if not folder or label == BASE or label in variants:
                raise SystemExit(f"variant {item!r}: give LABEL=FOLDER with a new label other than {BASE!r}")
            variants[label] = _install(label, Path(folder))
            copied += variants[label].values()
            print(f"{label}: {', '.join(variants[label]) or 'no template differs'}")
        originals = {op: kernel.template for op, kernel in REGISTRY.items()}

        # Load each variant's kernels (a first call of every case), keep them, check the outputs.
        hot, reference = {}, {}
        for label, renamed in variants.items():
            for op, kernel in REGISTRY.items():
                kernel.template = renamed.get(originals[op], originals[op])
                kernel._hot = {}
            for case in cases:
                out = [t.clone() for t in _outputs(case.fn())]
                torch.cuda.synchronize()
                if label == BASE:
                    reference[case.name] = out
                elif not all(torch.equal(a, b) for a, b in zip(out, reference[case.name])):
                    print(f"note: {label} gives other outputs than {BASE} for {case.name}")
            hot[label] = {op: kernel._hot for op, kernel in REGISTRY.items()}
        for op, kernel in REGISTRY.items():
            kernel.template = originals[op]

        labels = list(variants)
        times = {(label, case.name): [] for label in labels for case in cases}
        for r in range(args.rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):  # alternate the order between rounds
                for op, kernel in REGISTRY.items():
                    kernel._hot = hot[label][op]
                for case in cases:
                    times[label, case.name].append(bench.time_us(case.fn, reps=args.reps))
        print(f"{torch.cuda.get_device_name()}: {args.rounds} rounds x {args.reps} runs, µs")
        for case in cases:
            print(case.name)
            base = times[BASE, case.name]
            for label in labels:
                t = times[label, case.name]
                diff = "" if label == BASE else \
                    f"  paired diff {statistics.median(a - b for a, b in zip(t, base)):+.2f}"
                print(f"  {label:12s} median {statistics.median(t):7.2f}  min {min(t):7.2f}{diff}")
    finally:
        for name in copied:
            (compiler.TEMPLATE_DIR / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
