"""Strict prewarm for a training job.

GPU: ``linghe prewarm --preset moe-2048 --arch <local arch>`` fills a fresh cache folder; then a fresh process
with LINGHE_STRICT=1 runs the forward and backward of a small MoE block at the preset's compile-time shapes
(hidden 2048, 16 query and 4 key/value heads of 128, 256 experts top-8, expert FFN 1024, shared FFN 2048,
vocabulary 157184, 4 gate groups; 512 tokens) that launches every documented op, and nothing is compiled.
CPU: the strict switch turns a compile at run time into the documented error, naming the kernel and the
command that prewarms it; the cache's counters count compiles and hits.

Run as a script (the GPU test does), this file runs that block on cuda:0 and prints a JSON report.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = "moe-2048"
BF16 = torch.bfloat16


# ---------------------------------------------------------------- CPU -------
def test_strict_switch_raises_naming_the_key(tmp_path, monkeypatch):
    """Through the launch path and the environment switch (tests/test_cli.py covers Kernel.build's flag)."""
    from linghe import cache, runtime
    from linghe.kernel import StrictModeError
    from linghe.utils.norm import NORM_ROWS

    monkeypatch.setenv("LINGHE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LINGHE_STRICT", "1")
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_90a")  # no GPU needed to reach the check
    constants = dict(N=1408, DTYPE="bf16", WDTYPE="f32", ROUND_SCALE=True)
    spec = NORM_ROWS.spec("sm_90a", **constants)
    compiles = cache.STATS["compiles"]
    with pytest.raises(StrictModeError) as error:
        NORM_ROWS.launcher(torch.device("cuda", 0), *constants.values())
    message = str(error.value)
    assert spec.describe() in message and "LINGHE_STRICT" in message
    assert spec.prewarm_command() in message  # the command that prewarms exactly this kernel
    assert cache.STATS["compiles"] == compiles and not list(tmp_path.rglob("*.cubin"))
    assert (0, *constants.values()) not in NORM_ROWS._hot


def test_cache_counters_count_compiles_and_hits(tmp_path):
    from linghe import cache
    from linghe.utils.norm import NORM_ROWS

    spec = NORM_ROWS.spec("sm_90a", N=1408, DTYPE="bf16", WDTYPE="bf16", ROUND_SCALE=False)
    before = dict(cache.STATS)
    assert NORM_ROWS.build(spec, cache.DiskCache(tmp_path))[1]          # compiled and published
    assert not NORM_ROWS.build(spec, cache.DiskCache(tmp_path))[1]      # another process's view: from disk
    assert cache.STATS["compiles"] - before["compiles"] == 1
    assert cache.STATS["disk_hits"] - before["disk_hits"] == 1


# ---------------------------------------------------------------- GPU -------
@pytest.mark.gpu
def test_prewarmed_preset_covers_a_training_step(tmp_path):
    from linghe import presets
    from linghe.kernel import prewarm_specs
    from linghe.runtime import device_arch

    arch = device_arch(torch.cuda.current_device())
    env = dict(os.environ, LINGHE_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LINGHE_STRICT", None)
    warm = subprocess.run([sys.executable, "-m", "linghe.cli", "prewarm", "--preset", PRESET, "--arch", arch],
                          env=env, capture_output=True, text=True, timeout=900)
    assert warm.returncode == 0 and " 0 failed" in warm.stdout, warm.stdout + warm.stderr[-4000:]

    env["LINGHE_STRICT"] = "1"
    step = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    # A compile at run time raises StrictModeError, which names the kernel the preset misses.
    assert step.returncode == 0, step.stderr[-6000:]
    report = json.loads(step.stdout.strip().splitlines()[-1])
    assert report["stats"]["compiles"] == 0, report["stats"]
    assert report["stats"]["disk_hits"] >= len(report["loaded"]) > 0
    prewarmed = prewarm_specs(presets.get(PRESET), arch)
    assert set(report["loaded"]) <= {spec.describe() for _, spec in prewarmed}
    # The block reaches every kernel of the preset (of the GEMM, the family this GPU runs).
    other_gemm = "fp32_gemm_mma" if arch == "sm_90a" else "fp32_gemm_wgmma"
    assert {kernel.op for kernel, _ in prewarmed} - {other_gemm} <= set(report["ops"])
    assert all(math.isfinite(v) for v in report["values"].values()), report["values"]


# ---- the block (run in the strict subprocess) ----------------------------------------------------
class _Permute(torch.autograd.Function):
    """MoE dispatch with its adjoint (the unpermute) as backward, as an MoE layer pairs them."""

    @staticmethod
    def forward(ctx, x, probs, row_id_map, num_out):
        from linghe.utils.gather import triton_permute_with_mask_map

        rows, _, row_probs = triton_permute_with_mask_map(x, None, probs, row_id_map, num_out)
        ctx.save_for_backward(row_id_map)
        return rows, row_probs

    @staticmethod
    def backward(ctx, grad_rows, grad_row_probs):
        from linghe.utils.scatter import triton_unpermute_with_mask_map

        (row_id_map,) = ctx.saved_tensors
        grad_x, grad_probs = triton_unpermute_with_mask_map(grad_rows, row_id_map, grad_row_probs)
        return grad_x, grad_probs, None, None


class _Unpermute(torch.autograd.Function):
    """MoE combine with its adjoint (the permute) as backward."""

    @staticmethod
    def forward(ctx, rows, row_id_map, num_out):
        from linghe.utils.scatter import triton_unpermute_with_mask_map

        ctx.save_for_backward(row_id_map)
        ctx.num_out = num_out
        return triton_unpermute_with_mask_map(rows, row_id_map, None)[0]

    @staticmethod
    def backward(ctx, grad):
        from linghe.utils.gather import triton_permute_with_mask_map

        (row_id_map,) = ctx.saved_tensors
        return triton_permute_with_mask_map(grad, None, None, row_id_map, ctx.num_out)[0], None, None


def training_step(device, S=256, B=2, router_tokens=4096, seed=0):
    """Forward and backward of one MoE transformer block at the preset's widths; returns a few values.

    The bf16 path runs through autograd (linghe's autograd Functions, torch matmuls and attention). The FP8
    kernels run where an FP8 training step calls them, on the tensors its FP8 GEMMs would read: the norms'
    and SwiGLUs' quantised copies in the forward, the SwiGLU gradients and the transposed norm copy in the
    backward (tensor hooks). Gradient norm and zero count over the fp32 main grads and the bf16 grads close
    the step. ``router_tokens``: a second, longer micro-batch through the router GEMM, whose weight
    gradient then takes the split-K path.
    """
    import torch.nn.functional as F

    from linghe import presets
    from linghe.facade.fp32_linear import FusedFp32GEMM
    from linghe.facade.loss import SoftmaxCrossEntropyFunction
    from linghe.facade.norm import GroupNormGateFunction
    from linghe.facade.rope import QkNormHalfRopeFunction
    from linghe.reference import make_row_id_map
    from linghe.utils import silu
    from linghe.utils.gather import triton_permute_with_mask_map
    from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as norm_quant
    from linghe.utils.reduce import triton_batch_count_zero, triton_batch_sum_with_ord

    p = presets.get(PRESET)
    hidden, ffn, moe_ffn, E, topk = p["hidden"], p["ffn"], p["moe_ffn"], p["num_experts"], p["topk"]
    H, h, D, vocab, G = p["heads"], p["kv_heads"], p["head_dim"], p["vocab"], p["linear_attn_groups"]
    assert H * D == hidden, "the block's attention output feeds the gate norm at the model width"
    T = S * B
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, dtype=BF16, grad=False):
        t = (torch.randn(*shape, device=device, generator=gen) * scale + shift).to(dtype)
        return t.requires_grad_(grad)

    w_qkv = randn((H + 2 * h) * D, hidden, scale=0.02, grad=True)
    q_norm, k_norm = (randn(D, scale=0.1, shift=1.0, grad=True) for _ in range(2))
    w_gate = randn(hidden, hidden, scale=0.02, grad=True)
    gate_norm = randn(hidden, scale=0.1, shift=1.0, dtype=torch.float32, grad=True)  # a norm weight kept in fp32
    w_router = randn(E, hidden, scale=0.02, grad=True)
    w_up, w_down = randn(2 * moe_ffn, hidden, scale=0.02, grad=True), randn(hidden, moe_ffn, scale=0.02, grad=True)
    w_sup, w_sdown = randn(2 * ffn, hidden, scale=0.02, grad=True), randn(hidden, ffn, scale=0.02, grad=True)
    w_out = randn(vocab, hidden, scale=0.02, grad=True)
    ln1, ln2 = (randn(hidden, scale=0.1, shift=1.0) for _ in range(2))
    params = [w_qkv, q_norm, k_norm, w_gate, gate_norm, w_router, w_up, w_down, w_sup, w_sdown, w_out]
    fp8 = []  # what the FP8 GEMMs would read (kept alive to the end of the step)

    # -- attention: FP8 copies of the normalised input; QK norm + RoPE; attention; grouped norm with gate
    x = randn(S, B, hidden, grad=True)
    flat = x.reshape(T, hidden)
    fp8.append(norm_quant(flat.detach(), ln1, round_scale=True, output_mode=2))
    qkv = (flat @ w_qkv.t()).view(S, B, (H + 2 * h) * D)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D // 2, device=device, dtype=torch.float32) / (D // 2)))
    freqs = torch.arange(S, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    q, k, v = QkNormHalfRopeFunction.apply(qkv, q_norm, k_norm, freqs, H, h, 1e-6)
    k, v = (t.repeat_interleave(H // h, dim=2) for t in (k, v))
    attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    attn = attn.transpose(1, 2).reshape(B, S, hidden)
    gate = (flat @ w_gate.t()).view(S, B, hidden)
    x1 = (x + GroupNormGateFunction.apply(attn, gate, gate_norm, 1e-6, G)).reshape(T, hidden)

    # -- MoE: FP8 row-wise copy now, its transposed copy in the backward (from the saved rms)
    q8, s8, rms, _, _ = norm_quant(x1.detach(), ln2, round_scale=True, output_mode=0)
    x1.register_hook(lambda g: fp8.append(norm_quant(x1.detach(), ln2, rms=rms, round_scale=True, output_mode=1)))
    logits = FusedFp32GEMM.apply(x1, w_router)                      # [T, E] fp32
    top_p, top_i = torch.softmax(logits, dim=-1).topk(topk, dim=-1)
    routing = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, top_i, True)
    probs = torch.zeros(T, E, device=device).scatter(1, top_i, top_p)
    row_id_map, num_out = make_row_id_map(routing)
    counts = routing.sum(0)
    splits = counts.tolist()
    # the FP8 dispatch of a grouped GEMM: 16-row padded expert segments, codes with their block scales
    rid16, num_out16 = make_row_id_map(routing, 16)
    fp8.append(triton_permute_with_mask_map(q8, s8.t().contiguous(), None, rid16, num_out16, False, counts))
    rows, row_probs = _Permute.apply(x1, probs, row_id_map, num_out)
    up = rows @ w_up.t()                                            # [T * topk, 2 * moe_ffn]
    fp8.append(silu.triton_batch_weighted_silu_and_block_quant_forward(up.detach(), row_probs.detach(), counts,
                                                                      splits, round_scale=True))
    a, b = up.float().chunk(2, dim=-1)
    act = (F.silu(a) * b * row_probs[:, None]).to(BF16)
    act.register_hook(lambda g: fp8.append(silu.triton_batch_weighted_silu_and_block_quant_backward(
        g, up.detach(), row_probs.detach(), counts, splits, round_scale=True)))
    moe = _Unpermute.apply(act @ w_down.t(), row_id_map, num_out)

    # -- shared expert
    sup = x1 @ w_sup.t()                                            # [T, 2 * ffn]
    fp8.append(silu.triton_silu_and_block_quant_forward(sup.detach(), round_scale=True))
    sa, sb = sup.float().chunk(2, dim=-1)
    sact = (F.silu(sa) * sb).to(BF16)
    sact.register_hook(lambda g: fp8.append(silu.triton_silu_and_block_quant_backward(g, sup.detach(),
                                                                                      round_scale=True)))
    x2 = x1 + moe + sact @ w_sdown.t()

    # -- head and loss; backward through everything
    labels = torch.randint(0, vocab, (T,), device=device, generator=gen)
    loss = SoftmaxCrossEntropyFunction.apply(x2 @ w_out.t(), labels, False).mean()
    loss.backward()
    assert len(fp8) == 7, f"{len(fp8)} FP8 calls ran, not 4 in the forward and 3 in the backward"

    # -- a longer micro-batch through the router: d_weight's split-K partials and their reduction
    xr = randn(router_tokens, hidden, grad=True)
    lr = FusedFp32GEMM.apply(xr, w_router)
    router_grads = torch.autograd.grad(lr, (xr, w_router), torch.randn(lr.shape, device=device, generator=gen))

    # -- gradient statistics: fp32 main grads, and the bf16 grads as they came
    main_grads = [w.grad.float() for w in params]
    bf16_grads = [w.grad for w in params if w.grad.dtype == BF16]
    values = {"loss": loss.item(),
              "grad_sq_fp32": triton_batch_sum_with_ord(main_grads, 2).item(),
              "grad_sq_bf16": triton_batch_sum_with_ord(bf16_grads, 2).item(),
              "grad_sq_mixed": triton_batch_sum_with_ord(bf16_grads + [gate_norm.grad], 2).item(),
              "zeros_fp32": float(triton_batch_count_zero(main_grads).item()),
              "zeros_bf16": float(triton_batch_count_zero(bf16_grads).item()),
              "router_dw": float(router_grads[1].float().abs().sum())}
    torch.cuda.synchronize(device)
    return values


def main():
    from linghe import cache
    from linghe.kernel import REGISTRY

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    values = training_step(device)
    loaded = sorted(launcher.name for kernel in REGISTRY.values() for launcher in kernel._hot.values())
    ops = sorted(kernel.op for kernel in REGISTRY.values() if kernel.loaded())
    print(json.dumps({"stats": dict(cache.STATS), "loaded": loaded, "ops": ops, "values": values}))


if __name__ == "__main__":
    main()
