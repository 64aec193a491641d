"""What tools/bench.py needs from each op's bench module (tools/bench_ops/<op>.py).

A bench module defines ``cases() -> list[Case]``. Each case builds its inputs
once (fresh random data, never zeros) and gives closures to time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Case:
    op: str                      # stem, e.g. "norm", "silu"
    name: str                    # what is timed, e.g. "rms_norm_and_block_quant mode=2 [8192,2048]"
    fn: Callable[[], object]     # the linghe call (wrapper overhead included)
    floor_bytes: int             # fewest bytes the op must move (each input read once, each output written once)
    torch_fn: Optional[Callable[[], object]] = None   # plain-PyTorch equivalent, for comparison
    target_us: Optional[float] = None                 # TARGETS.md (H200) target, if any
    flops: int = 0                                    # for compute-bound ops (GEMM)
