"""FusedFp32GEMM (router GEMM) at the TARGETS.md shape: input [2, 4096, 2048] bf16, weight [256, 2048] bf16.

Forward and backward (fp32 grad_output, both gradients) against cuBLAS: a bf16 GEMM with fp32 output
(torch.mm with out_dtype where this torch has it, else the fp32 GEMM of up-cast copies). Extra rows:
the backward with grad_output rounded to bf16 (split=False), and on Hopper the mma.sync kernels.
"""
import os
import sys

import torch
import torch.nn.functional as F

if __name__ == "__main__":  # run as a script (development): tools/ and the repository on the path
    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
from benchlib import Case  # noqa: E402
from linghe.facade.fp32_linear import fp32_gemm_backward, fp32_gemm_forward

B, S, E, K = 2, 4096, 256, 2048
M = B * S
FWD_FLOOR, BWD_FLOOR = 42_991_616, 77_594_624  # SPEC.md §7.2
DX_FLOOR = M * E * 4 + E * K * 2 + M * K * 2  # grad_output, weight in; d_input out
DW_FLOOR = M * E * 4 + M * K * 2 + E * K * 2  # grad_output, input in; d_weight out
FLOPS = 2 * M * E * K


def _mm_fp32_out():
    """torch.mm(a, b, out_dtype=float32) on bf16 operands if available (cuBLAS bf16 GEMM, fp32 output)."""
    a = torch.randn(8, 8, device="cuda", dtype=torch.bfloat16)
    try:
        out = torch.mm(a, a, out_dtype=torch.float32)
        if out.dtype == torch.float32:
            return lambda x, y: torch.mm(x, y, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        pass
    return None


def cases():
    x = torch.randn(B, S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, S, E, device="cuda") * 1e-3
    x2, g2 = x.view(M, K), g.view(M, E)
    mm = _mm_fp32_out()
    if mm is not None:
        wt = w.t()

        def torch_fwd():
            return mm(x2, wt)

        def torch_bwd():  # grad_output rounded to bf16 first: what cuBLAS's bf16 GEMM can take
            gb = g2.bfloat16()
            return mm(gb, w).bfloat16(), mm(gb.t(), x2).bfloat16()
        label = "torch.mm(bf16, out_dtype=fp32)"
    else:
        def torch_fwd():
            return F.linear(x.float(), w.float())

        def torch_bwd():
            return (g2 @ w.float()).bfloat16(), (g2.t() @ x2.float()).bfloat16()
        label = "fp32 GEMM of up-cast copies"
    tag = f"x[{B},{S},{K}] w[{E},{K}] bf16"
    # flops: the useful 2*M*E*K per GEMM (the hi+lo split does twice that on the tensor cores)
    out = [
        Case("fp32_gemm", f"FusedFp32GEMM forward {tag} (torch: {label})", lambda: fp32_gemm_forward(x, w),
             FWD_FLOOR, torch_fn=torch_fwd, target_us=20, flops=FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, fp32 grad split hi+lo (torch: {label})",
             lambda: fp32_gemm_backward(g, x, w), BWD_FLOOR, torch_fn=torch_bwd, target_us=40, flops=2 * FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, grad rounded to bf16 (split=False)",
             lambda: fp32_gemm_backward(g, x, w, split=False), BWD_FLOOR, torch_fn=torch_bwd, flops=2 * FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, d_input only (split)",
             lambda: fp32_gemm_backward(g, x, w, need_weight_grad=False), DX_FLOOR, flops=FLOPS),
        Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, d_weight only (split)",
             lambda: fp32_gemm_backward(g, x, w, need_input_grad=False), DW_FLOOR, flops=FLOPS),
    ]
    if torch.cuda.get_device_capability() == (9, 0):  # the sm_80 kernels on Hopper, for comparison
        out += [
            Case("fp32_gemm", f"FusedFp32GEMM forward {tag}, mma.sync kernel", lambda: fp32_gemm_forward(
                x, w, impl="mma"), FWD_FLOOR, flops=FLOPS),
            Case("fp32_gemm", f"FusedFp32GEMM backward {tag}, mma.sync kernels", lambda: fp32_gemm_backward(
                g, x, w, impl="mma"), BWD_FLOOR, flops=2 * FLOPS),
        ]
    return out


# ---- development: python3 tools/bench_ops/fp32_gemm.py --smoke | --sweep -------------------------------
def _smoke() -> bool:
    """Errors of every GEMM against float64 at a few shapes, both kernel families (quick, prints a table)."""
    from linghe.utils import fp32_gemm as G
    from linghe.reference.gemm import ref_fp32_gemm_backward, ref_fp32_gemm_forward

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    ok = True
    impls = ["wgmma", "mma"] if torch.cuda.get_device_capability() == (9, 0) else ["mma"]
    for lead, e, k in [((2, 4096), 256, 2048), ((77,), 8, 16384), ((3, 37), 13, 100), ((1000,), 160, 1088),
                       ((300,), 512, 64), ((5,), 1, 1), ((4096,), 256, 8192)]:
        gen = torch.Generator(device="cuda").manual_seed(e + k)
        x = torch.randn(*lead, k, device="cuda", generator=gen).bfloat16()
        w = torch.randn(e, k, device="cuda", generator=gen).bfloat16()
        g = torch.randn(*lead, e, device="cuda", generator=gen) * 1e-3
        y_ref = ref_fp32_gemm_forward(x, w)
        dx_ref, dw_ref = ref_fp32_gemm_backward(g, x, w)
        for impl in impls:
            y = G.fp32_gemm_forward(x, w, impl=impl)
            dx, dw = G.fp32_gemm_backward(g, x, w, grad_dtype=torch.float32, impl=impl)
            torch.cuda.synchronize()
            errs = (rel(y, y_ref), rel(dx, dx_ref), rel(dw, dw_ref))
            bad = not (errs[0] <= 1e-5 and errs[1] <= 2e-5 and (dw.numel() < 64 or errs[2] <= 2e-5))
            ok &= not bad
            print(f"{'FAIL' if bad else 'ok  '} {impl:6s} lead={lead} E={e} K={k}: logits {errs[0]:.2e} "
                  f"dx {errs[1]:.2e} dw {errs[2]:.2e}", flush=True)
    return ok


def _sweep():
    """Tile / cluster / promotion variants of each GEMM at the benchmark shape, next to cuBLAS."""
    from bench import time_us

    from linghe.utils import fp32_gemm as G

    dev = torch.device("cuda")
    x = torch.randn(B, S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, S, E, device="cuda") * 1e-3
    x2, g2 = x.view(M, K), g.view(M, E)
    xo, wo = G._operand(x2, "bf16", dev, pad=True), G._operand(w, "bf16", dev, pad=True)
    g_split = G._operand(g2, "bf16", dev, max_parts=2, pad=True)
    g_one = G._operand(g2, "bf16", dev, max_parts=1, pad=True)
    y = torch.empty(M, E, device="cuda")
    dx = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
    rows = []

    def t(name, fn, flops):
        us = time_us(fn, reps=30)
        rows.append((name, us, flops / us / 1e6))
        print(f"{name:58s} {us:8.1f} us {flops / us / 1e6:7.1f} TFLOP/s", flush=True)

    mm = _mm_fp32_out()
    gb = g2.bfloat16()
    if mm is not None:
        t("cuBLAS fwd torch.mm(bf16, out fp32)", lambda: mm(x2, w.t()), FLOPS)
        t("cuBLAS dx mm(g bf16, w) -> fp32", lambda: mm(gb, w), FLOPS)
        t("cuBLAS dw mm(g^T bf16, x) -> fp32", lambda: mm(gb.t(), x2), FLOPS)
    t("cuBLAS bf16 dx gb @ w", lambda: gb @ w, FLOPS)
    t("cuBLAS bf16 dw gb.t() @ x", lambda: gb.t() @ x2, FLOPS)
    for impl in ("wgmma", "mma"):
        t(f"{impl} forward (default)", lambda: fp32_gemm_forward(x, w, impl=impl), FLOPS)
    t("wgmma backward split (default)", lambda: fp32_gemm_backward(g, x, w), 4 * FLOPS)
    t("wgmma backward split=False", lambda: fp32_gemm_backward(g, x, w, split=False), 2 * FLOPS)
    t("wgmma backward split, d_input only", lambda: fp32_gemm_backward(g, x, w, need_weight_grad=False), 2 * FLOPS)
    t("wgmma backward split, d_weight only", lambda: fp32_gemm_backward(g, x, w, need_input_grad=False), 2 * FLOPS)
    t("split kernel g -> hi, lo", lambda: G._operand(g2, "bf16", dev, max_parts=2, pad=True), 0)
    t("split kernel g -> bf16", lambda: G._operand(g2, "bf16", dev, max_parts=1, pad=True), 0)
    def short(cfg):
        keys = ("BN", "STAGES", "PROMO", "PINGPONG", "STV")
        return {k: v for k, v in cfg.items() if k in keys}

    for cfg in ({}, {"STV": False}):
        t(f"fwd {short(cfg)}", lambda: G._gemm("wgmma", "fwd", "bf16", xo, wo, M, E, K, E, K, y, dev, config=cfg or None),
          FLOPS)
    for ga, tag, f in ((g_split, "split", 2 * FLOPS), (g_one, "bf16 g", FLOPS)):
        ap = 2 if ga is g_split else 1
        for cfg in ({}, {"STV": False}, {"PINGPONG": False}):
            t(f"dx {tag} {short(cfg)}", lambda: G._gemm("wgmma", "dx", "bf16", ga, wo, M, K, E, E, K, dx, dev,
                                                        config=cfg or None), f)
        tiles = 2 * (K // 256)
        kt = M // 64
        chunk = min(max(1, G.DW_CHAIN // (64 * ap)), -(-kt // max(1, 132 // tiles)))
        splits = -(-kt // chunk)
        part = torch.empty(splits, E, K, device="cuda")
        for cfg in ({}, {"STV": False}):
            t(f"dw {tag} splits={splits} {short(cfg)}", lambda: G._gemm("wgmma", "dw", "bf16", ga, xo, E, K, M, E, K,
                                                                        part, dev, splits=splits, k_chunk=chunk,
                                                                        config=cfg or None), f)
    part = torch.empty(8, E, K, device="cuda")
    dwo = torch.empty(E, K, device="cuda", dtype=torch.bfloat16)
    t("reduce 8 fp32 partials -> bf16", lambda: G.REDUCE.launcher(dev, "bf16")(
        (E * K // 1024, 1, 1), (256, 1, 1), (part.data_ptr(), dwo.data_ptr(), E * K, 8)), 0)


def _ncu():
    """One call of each op (the kernels run once each: for tools/ncu.sh)."""
    x = torch.randn(B, S, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, K, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(B, S, E, device="cuda") * 1e-3
    fp32_gemm_forward(x, w)
    fp32_gemm_backward(g, x, w)
    torch.cuda.synchronize()


def _sass(out_dir):
    """SASS of the cached wgmma GEMM cubins (cuobjdump) into out_dir, with a count of key instructions."""
    import glob
    import json
    import os
    import re
    import subprocess

    root = os.environ.get("LINGHE_CACHE_DIR", "/tmp/linghe-cache")
    for meta_path in sorted(glob.glob(f"{root}/**/*.json", recursive=True)):
        meta = json.load(open(meta_path))
        if meta.get("op") != "fp32_gemm_wgmma":
            continue
        c = meta["constants"]
        tag = "_".join(f"{k}{v}" for k, v in c.items() if k in ("A_KMAJOR", "B_KMAJOR", "AP", "BN", "OUT", "PROMO",
                                                                 "CLUSTER", "STAGES"))
        sass = subprocess.run(["cuobjdump", "-sass", meta_path[:-5] + ".cubin"], capture_output=True, text=True).stdout
        counts = {op: len(re.findall(op, sass)) for op in ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "LDL", "STL",
                                                           "UTMALDG", "SYNCS")}
        print(tag, counts, flush=True)
        fwd = c["B_KMAJOR"] and c["PROMO"] == 8 and c["STAGES"] == 7 and c.get("STV")
        dx = c["A_KMAJOR"] and not c["B_KMAJOR"] and c["AP"] == 2 and c.get("PINGPONG") and c.get("STV")
        if fwd or dx:
            with open(os.path.join(out_dir, f"sass_{tag}.txt"[:120]), "w") as handle:
                handle.write(sass)


if __name__ == "__main__":
    if "--sass" in sys.argv:
        _sass(sys.argv[-1])

    if "--smoke" in sys.argv:
        sys.exit(0 if _smoke() else 1)
    if "--sweep" in sys.argv:
        _sweep()
    if "--ncu" in sys.argv:
        _ncu()
