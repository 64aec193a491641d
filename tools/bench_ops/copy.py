"""Reference points, not linghe ops: plain device copies with the byte counts of the targeted ops, timed
by the same method. They show what "% of floor" a pure read+write stream reaches at these sizes, e.g.
that QkNormHalfRope forward (read 50 MB, write 50 MB) is bounded by about a copy's speed."""
import torch

from benchlib import Case


def _copy_case(name, nbytes):
    src = torch.randn(nbytes // 4 // 2, device="cuda")   # nbytes = read + written
    dst = torch.empty_like(src)
    return Case("copy", f"torch copy {name}: {nbytes / 1e6:.0f} MB read + written", lambda: dst.copy_(src), nbytes)


def cases():
    return [_copy_case("(rope forward's bytes)", 2 * 4096 * 2 * 3072 * 2),
            _copy_case("(GroupNormGate backward's bytes)", 167_780_352),
            _copy_case("(rms_norm mode 2's bytes)", 68_194_304),
            _copy_case("(rms_norm mode 0's bytes)", 50_855_936)]
