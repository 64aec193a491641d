"""Every documented op at small shapes, for tests/test_multi_gpu.py, and (run as a script) one rank of its
shared-cache test:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/multi_gpu_worker.py OUT_DIR

Each rank runs every case on cuda:LOCAL_RANK, starting together with the other ranks, and writes
OUT_DIR/rank<r>.json: the cache's counters (linghe.cache.STATS) and the content keys of every kernel it
loaded. Not a pytest module (no test_ prefix). Inputs are drawn on the CPU from fixed seeds and then moved,
so every device gets identical values.
"""
from __future__ import annotations

import json
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(seed, *shape, dtype=BF16):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _rand(seed, *shape):
    return torch.rand(*shape, generator=_gen(seed))


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


@lru_cache(maxsize=None)
def cases() -> dict:
    """name -> (make(device, seed) -> tuple of tensors, fn(*tensors) -> outputs to compare).

    The autograd Functions' fns run forward and ``torch.autograd.grad``. Values that must stay fixed
    (routing maps, expert counts: they set Python ints the calls take) do not depend on the seed."""
    from linghe.facade.fp32_linear import FusedFp32GEMM
    from linghe.facade.loss import SoftmaxCrossEntropyFunction
    from linghe.facade.norm import GroupNormGateFunction
    from linghe.facade.rope import QkNormHalfRopeFunction
    from linghe.reference import make_row_id_map
    from linghe.utils import silu
    from linghe.utils.gather import triton_permute_with_mask_map as permute
    from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as norm
    from linghe.utils.reduce import triton_batch_count_zero, triton_batch_sum_with_ord
    from linghe.utils.scatter import triton_unpermute_with_mask_map as unpermute

    table = {}

    def case(name, make_cpu, fn):
        table[name] = (lambda device, seed: tuple(t.to(device) for t in make_cpu(seed)), fn)

    def rms_norm(x, w):
        both = norm(x, w, round_scale=True, output_mode=2)            # the fused kernel
        rows = norm(x, w, output_mode=0)[:3]                          # the row kernel (transposes unwritten)
        cols = norm(x, w, rms=rows[2], output_mode=1)[2:]             # the column kernel
        return both, rows, cols

    case("rms_norm_quant", lambda s: (_randn(s, 300, 1024), _randn(7, 1024)), rms_norm)

    S, B, H, h, D = 64, 2, 8, 2, 128

    def rope(qkv, qw, kw, freqs, gq, gk, gv):
        qkv, qw, kw = _leaves(qkv, qw, kw)
        q, k, v = QkNormHalfRopeFunction.apply(qkv, qw, kw, freqs, H, h, 1e-6)
        return (q, k, v, *torch.autograd.grad((q, k, v), (qkv, qw, kw), (gq, gk, gv)))

    case("qk_norm_half_rope", lambda s: (_randn(s, S, B, (H + 2 * h) * D), _randn(10 * s + 1, D),
                                         _randn(10 * s + 2, D), _rand(10 * s + 3, S, D // 2) * 3,
                                         _randn(10 * s + 4, B, S, H, D), _randn(10 * s + 5, B, S, h, D),
                                         _randn(10 * s + 6, B, S, h, D)), rope)

    def gemm(x, w, grad):
        x, w = _leaves(x, w)
        logits = FusedFp32GEMM.apply(x, w)
        return (logits, *torch.autograd.grad(logits, (x, w), grad))

    # 2048 tokens: d_weight takes the split-K path
    case("fused_fp32_gemm", lambda s: (_randn(s, 2, 1024, 512), _randn(10 * s + 1, 64, 512),
                                       _randn(10 * s + 2, 2, 1024, 64, dtype=torch.float32)), gemm)

    T, E, hidden = 300, 16, 512
    routing = torch.zeros(T, E, dtype=torch.bool).scatter_(1, _randn(11, T, E, dtype=torch.float32).topk(4, 1).indices,
                                                           True)
    rid, num_out = make_row_id_map(routing)
    rid16, num_out16 = make_row_id_map(routing, 16)
    per_expert = routing.sum(0).to(torch.int32)

    def moe(x, scale, probs, x8, scale8, rid, rid16, per_expert):
        dense = permute(x, scale, probs, rid, num_out)
        padded = permute(x, scale, probs, rid16, num_out16, False, per_expert)
        fp8 = permute(x8, scale8, None, rid16, num_out16, False, per_expert)   # codes with block scales
        return dense, padded, fp8, unpermute(dense[0], rid, dense[2]), unpermute(padded[0], rid16, None)

    case("permute_unpermute", lambda s: (_randn(s, T, hidden), _rand(10 * s + 1, T), _rand(10 * s + 2, T, E),
                                         _randn(10 * s + 3, T, hidden, dtype=torch.float32).to(FP8),
                                         _rand(10 * s + 4, T, hidden // 128), rid, rid16, per_expert), moe)

    case("silu_forward", lambda s: (_randn(s, 257, 1024),),
         lambda x: silu.triton_silu_and_block_quant_forward(x, round_scale=True))
    case("silu_backward", lambda s: (_randn(s, 257, 512), _randn(10 * s + 1, 257, 1024)),
         lambda g, x: silu.triton_silu_and_block_quant_backward(g, x))
    splits = [100, 0, 37, 120]
    counts = torch.tensor(splits)
    rows = sum(splits)
    case("batch_silu_forward", lambda s: (_randn(s, rows, 512), _rand(10 * s + 1, rows, 1), counts),
         lambda x, w, c: silu.triton_batch_weighted_silu_and_block_quant_forward(x, w, c, splits, round_scale=True))
    case("batch_silu_backward", lambda s: (_randn(s, rows, 256), _randn(10 * s + 1, rows, 512),
                                           _rand(10 * s + 2, rows, 1), counts),
         lambda g, x, w, c: silu.triton_batch_weighted_silu_and_block_quant_backward(g, x, w, c, splits))

    M, V = 100, 5003
    labels = torch.randint(-1, V, (M,), generator=_gen(12))   # -1: an ignored token

    def cross_entropy(inplace):
        def fn(logits, labels, grad):
            (x,) = _leaves(logits)
            loss = SoftmaxCrossEntropyFunction.apply(x, labels, inplace)
            return (loss, *torch.autograd.grad(loss, (x,), grad))
        return fn

    for inplace in (False, True):
        case(f"cross_entropy_inplace_{inplace}", lambda s: (_randn(s, M, V), labels, _rand(10 * s + 1, M)),
             cross_entropy(inplace))

    def reductions(*xs):
        xs = list(xs)
        return triton_batch_sum_with_ord(xs, 2), triton_batch_sum_with_ord(xs, 1), triton_batch_count_zero(xs)

    case("batch_reductions", lambda s: (_randn(s, 1000, dtype=torch.float32), _randn(10 * s + 1, 33, 65),
                                        torch.zeros(0), _randn(10 * s + 2, 4097, dtype=torch.float32).relu()),
         reductions)

    Bg, Sg, dim = 2, 60, 1024

    def norm_gate(x, gate, w, grad):
        x, gate, w = _leaves(x, gate, w)
        out = GroupNormGateFunction.apply(x, gate, w, 1e-6, 4)
        return (out, *torch.autograd.grad(out, (x, gate, w), grad))

    case("group_norm_gate", lambda s: (_randn(s, Bg, Sg, dim), _randn(10 * s + 1, Sg, Bg, dim),
                                       _randn(10 * s + 2, dim), _randn(10 * s + 3, Sg, Bg, dim)), norm_gate)
    return table


def tensors(out):
    """The tensors in a nested output, in order (None skipped)."""
    if out is None:
        return []
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors(item)]
    return [out]


def same(a, b, path="out"):
    """Bitwise equality of two nested outputs, wherever each lives (fp8 compared as bytes)."""
    if a is None or b is None:
        assert a is None and b is None, f"{path}: one side is None"
        return
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{path}: different structure"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
        return
    assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b), f"{path}: values differ"


def _wait_for_ranks(folder: Path, rank: int, world: int, timeout_s: float = 300.0) -> None:
    """Start together: every rank has CUDA up and the ops imported before any compiles."""
    (folder / f"ready{rank}").touch()
    deadline = time.monotonic() + timeout_s
    while not all((folder / f"ready{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: the other ranks did not get ready in {timeout_s} s")
        time.sleep(0.002)


def main(out_dir: str) -> None:
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    from linghe import cache
    from linghe.kernel import REGISTRY
    from linghe.runtime import device_arch

    work = cases()
    folder = Path(out_dir)
    _wait_for_ranks(folder, rank, world)
    for make, fn in work.values():
        fn(*make(device, 1))
    torch.cuda.synchronize(device)
    stats = dict(cache.STATS)
    arch, keys = device_arch(rank), set()
    for kernel in REGISTRY.values():
        for hot_key in list(kernel._hot):
            if hot_key[0] == rank:
                spec = kernel.spec(arch, **dict(zip(kernel.params, hot_key[1:])))
                keys.add(kernel.build(spec, allow_compile=False)[0].key)
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "stats": stats, "keys": sorted(keys)}))


if __name__ == "__main__":
    main(sys.argv[1])
