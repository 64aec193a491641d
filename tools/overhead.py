"""Host time per call at a tiny shape: the eager documented function (its direct path) vs the same
kernel through its registered ``torch.ops.linghe`` operator (the dispatcher: what a compiled graph
calls), and optionally a ``torch.compile``'d call of the documented function.

    python3 tools/overhead.py              # prints a markdown table
    python3 tools/overhead.py --no-compile # skip the torch.compile column (saves ~1 min of compiling)

Host time only: calls are timed in chunks short enough that the launch queue never fills, and the
device is synchronised between chunks, outside the timing. Median over chunks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from linghe import library  # noqa: E402
from linghe.reference import make_row_id_map  # noqa: E402
from linghe.utils import fp32_gemm, gather, loss, norm, norm_gate, reduce, rope, silu  # noqa: E402

CHUNK, CHUNKS = 100, 40  # calls per timed chunk (<= 2 launches each: far below the queue depth), chunks


def host_us(fn) -> float:
    for _ in range(20):  # compile/load the kernels, warm the caches
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(CHUNKS):
        start = time.perf_counter()
        for _ in range(CHUNK):
            fn()
        per_call.append((time.perf_counter() - start) / CHUNK * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def cases():
    """label -> (direct call, operator call, documented function and its arguments for torch.compile)."""
    dev, bf = "cuda", torch.bfloat16

    def r(*shape, dtype=bf):
        return torch.randn(shape, device=dev).to(dtype)

    x, w = r(16, 256), r(256)
    xs = r(16, 512)
    routing = torch.rand(16, 8, device=dev) < 0.4
    rid, nout = make_row_id_map(routing)
    inp, probs = r(16, 256), torch.rand(16, 8, device=dev)
    qkv, qw, kw, freqs = r(4, 1, 512), r(64), r(64), torch.rand(4, 32, device=dev)
    xg, gate, wg = r(1, 4, 256), r(4, 1, 256), r(256)
    xi, wi = r(16, 128), r(16, 128)
    logits, labels = r(16, 512), torch.randint(0, 512, (16,), device=dev)
    xs_list = [r(16, 256, dtype=torch.float32)]
    ops = library.OPS
    return {
        "rms_norm_and_block_quant (mode 2)": (
            lambda: norm.triton_rms_norm_and_block_quant_forward(x, w, 1e-6, None, None, None, True, 2),
            lambda: ops["rms_norm_block_quant"](x, w, 1e-6, None, True, 2),
            (lambda x, w: norm.triton_rms_norm_and_block_quant_forward(x, w, round_scale=True), (x, w))),
        "silu_and_block_quant_forward": (
            lambda: silu.triton_silu_and_block_quant_forward(xs, None, None, True, 2),
            lambda: ops["silu_block_quant_forward"](xs, True, 2),
            (lambda x: silu.triton_silu_and_block_quant_forward(x, round_scale=True), (xs,))),
        "permute_with_mask_map": (
            lambda: gather.triton_permute_with_mask_map(inp, None, probs, rid, nout),
            lambda: ops["permute_with_mask_map"](inp, None, probs, rid, nout, True, None),
            (lambda i, p, m: gather.triton_permute_with_mask_map(i, None, p, m, nout), (inp, probs, rid))),
        "qk_norm_half_rope_forward": (
            lambda: rope.qk_norm_half_rope_forward(qkv, qw, kw, freqs, 4, 2),
            lambda: ops["qk_norm_half_rope_forward"](qkv, qw, kw, freqs, 4, 2, 1e-6),
            (lambda *a: rope.qk_norm_half_rope_forward(*a, 4, 2), (qkv, qw, kw, freqs))),
        "group_norm_gate_forward": (
            lambda: norm_gate.group_norm_gate_forward(xg, gate, wg, 1e-6, 4),
            lambda: ops["group_norm_gate_forward"](xg, gate, wg, 1e-6, 4),
            (lambda *a: norm_gate.group_norm_gate_forward(*a, 1e-6, 4), (xg, gate, wg))),
        "fp32_gemm_forward": (
            lambda: fp32_gemm.fp32_gemm_forward(xi, wi),
            lambda: ops["fp32_gemm_forward"](xi, wi, None),
            (fp32_gemm.fp32_gemm_forward, (xi, wi))),
        "softmax_cross_entropy_forward": (
            lambda: loss.softmax_cross_entropy_forward(logits, labels),
            lambda: ops["softmax_cross_entropy_forward"](logits, labels),
            (loss.softmax_cross_entropy_forward, (logits, labels))),
        "batch_count_zero (1 tensor)": (
            lambda: reduce.triton_batch_count_zero(xs_list),
            lambda: ops["batch_count_zero"](xs_list),
            (lambda a: reduce.triton_batch_count_zero([a]), (xs_list[0],))),
    }


def main():
    parser = argparse.ArgumentParser(description="Host time per call: eager direct vs the registered operator.")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("overhead.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; host us per call, median of "
          f"{CHUNKS} chunks of {CHUNK} calls\n")
    check = host_us(torch.compiler.is_compiling)
    header = "| op | eager (direct) | torch.ops.linghe | registration cost |"
    header += "" if args.no_compile else " torch.compile'd |"
    print(header)
    print("|" + "---|" * header.count(" |"))
    for label, (direct, op, (fn, fn_args)) in cases().items():
        t_direct, t_op = host_us(direct), host_us(op)
        row = f"| {label} | {t_direct:.1f} | {t_op:.1f} | {t_op - t_direct:+.1f} |"
        if not args.no_compile:
            compiled = torch.compile(fn, fullgraph=True)
            row += f" {host_us(lambda: compiled(*fn_args)):.1f} |"
        print(row, flush=True)
    print(f"\nThe eager path's routing check, torch.compiler.is_compiling(), alone: {check:.2f} us per call.")


if __name__ == "__main__":
    main()
