"""GroupNormGate (SPEC.md §4.13): GroupNormGateFunction and linghe.utils.norm_gate's plain functions."""
import random

import pytest
import torch

from helpers import rel
from linghe import presets
from linghe.reference.norm_gate import ref_group_norm_gate, ref_group_norm_gate_backward
from linghe.utils import norm_gate as ng

TOL = 4e-3   # SPEC: rel <= 4e-3 for out, dx, dgate, dweight


# ---------------------------------------------------------------- CPU: layouts, compiles, validation

def _layout_cases():
    dims = [(2048, 4), (4096, 4), (1536, 4), (1536, 8), (7168, 8), (16384, 1), (16384, 2), (16384, 8),
            (1000, 8), (1544, 4), (1552, 4), (24, 8), (12, 4), (96, 3), (4096, 2048), (2048, 2048),
            (16384, 16384), (32768, 1), (32768, 16384), (3, 3), (8, 1), (32760, 7)]
    rng = random.Random(0)
    for _ in range(60):
        dim = rng.randint(1, 32768)
        divisors = [g for g in range(1, min(dim, 16384) + 1) if dim % g == 0]
        dims.append((dim, rng.choice(divisors)))
    return dims


@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_layouts_cover_every_channel_once(elem_bytes):
    """Replays the kernels' thread -> channel mapping: every team covers each channel exactly once,
    reductions stay inside aligned lane groups or whole warps, and every supported shape fits."""
    for dim, groups in _layout_cases():
        for words, cta, backward in ((ng.FWD_WORDS, ng.FWD_CTA, False), (ng.BWD_WORDS, ng.BWD_CTA, True)):
            g = ng.geometry(dim, groups, elem_bytes, words, cta)
            what = f"dim={dim} G={groups} bytes={elem_bytes} {'bwd' if backward else 'fwd'} {g}"
            assert ng._fits(g, backward), what
            names = ("D", "VE", "NV", "TPG", "NPT", "GS", "NP", "TT", "T", "THREADS")
            D, VE, NV, TPG, NPT, GS, NP, TT, T, THREADS = (g[k] for k in names)
            assert D * groups == dim and D % VE == 0 and NV * VE == D and VE in (1, 2, 4, 8)
            assert TPG & (TPG - 1) == 0 and TPG <= 1024 and NPT * TPG >= NV
            assert TT == GS * TPG and T * TT <= THREADS <= 1024 and THREADS % 32 == 0
            assert THREADS - T * TT < 32, what               # padding is less than one warp
            if TPG > 32:
                assert TT % 32 == 0 and THREADS == T * TT, what  # groups are whole warps, no padding
            assert g["SMEM"] == T * dim * 4
            for team in range(T):
                seen = []
                for tid in range(team * TT, (team + 1) * TT):
                    slot, t = tid % TT // TPG, tid % TPG
                    for p in range(NP):
                        k = p * GS + slot
                        if k >= groups:
                            continue
                        for j in range(NPT):
                            v = j * TPG + t
                            if v < NV:
                                c = k * D + v * VE
                                assert c % VE == 0
                                seen.extend(range(c, c + VE))
                assert sorted(seen) == list(range(dim)), what
                if dim > 4096:
                    break  # one team suffices for the big ones (all teams are identical)


def test_too_large_shapes_raise_before_launch():
    x = torch.randn(1, 1, 65536)
    with pytest.raises(ValueError, match="dim"):
        ng.group_norm_gate_forward(x, torch.randn(1, 1, 65536), torch.randn(65536), 1e-6, 1)


def _compile(kernel, arch, tmp_path, **constants):
    from linghe.cache import DiskCache

    entry, _ = kernel.build(kernel.spec(arch, **constants), DiskCache(tmp_path))
    assert entry.cubin


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_prewarm_specs_compile(preset, tmp_path):
    specs = list(ng._prewarm(presets.get(preset)))
    assert {k.op for k, _ in specs} == {"group_norm_gate_fwd", "group_norm_gate_bwd", "group_norm_gate_dw"}
    archs = ("sm_90a", "sm_80") if preset == presets.DEFAULT_PRESET else ("sm_90a",)
    for arch in archs:
        for kernel, constants in specs:
            _compile(kernel, arch, tmp_path, **constants)


EDGE_SPECS = [  # (dim, G, x, gate, weight, grad): every code path of the templates
    (1536, 4, "bf16", "bf16", "bf16", "bf16"),
    (16384, 1, "bf16", "bf16", "f32", "bf16"),   # TPG > 32: shared-memory group sums, big dweight smem
    (16384, 8, "f16", "f16", "f16", "f16"),
    (1000, 8, "bf16", "f32", "bf16", "f32"),     # d = 125: scalar vectors, mixed dtypes
    (1544, 4, "f32", "f32", "f32", "f32"),       # d = 386: 2-element vectors
    (1552, 4, "bf16", "bf16", "bf16", "bf16"),   # d = 388: 4-element vectors, partial last sweep
    (96, 3, "bf16", "bf16", "bf16", "bf16"),     # padding threads past T teams
    (4096, 2048, "bf16", "f16", "f32", "bf16"),  # d = 2: two passes over groups
]


@pytest.mark.parametrize("dim,G,xd,gd,wd,dd", EDGE_SPECS)
def test_edge_specialisations_compile(dim, G, xd, gd, wd, dd, tmp_path):
    _compile(ng.FWD, "sm_90a", tmp_path, DIM=dim, G=G, XDTYPE=xd, GDTYPE=gd, WDTYPE=wd)
    _compile(ng.BWD, "sm_90a", tmp_path, DIM=dim, G=G, XDTYPE=xd, GDTYPE=gd, WDTYPE=wd, DDTYPE=dd)


def test_benchmark_specialisations_do_not_spill():
    """The backward must fit 128 registers at 512 threads (one CTA per SM, few partial rows) and the
    forward stay small; a spill or register blow-up here costs bandwidth on the GPU."""
    import re

    from linghe import compiler

    for kernel, constants, max_regs in (
            (ng.FWD, dict(DIM=2048, G=4, XDTYPE="bf16", GDTYPE="bf16", WDTYPE="bf16"), 64),
            (ng.BWD, dict(DIM=2048, G=4, XDTYPE="bf16", GDTYPE="bf16", WDTYPE="bf16", DDTYPE="bf16"), 128)):
        source = kernel.render(kernel.spec("sm_90a", **constants))
        options = compiler.nvrtc_options("sm_90a") + ["--ptxas-options=-v"]
        log = compiler.compile_cubin(kernel.op, source, compiler.headers_for(source), options).log
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        if regs is None or spills is None:
            pytest.skip(f"ptxas -v output not recognised: {log[:200]!r}")
        assert int(regs.group(1)) <= max_regs, f"{kernel.op}: {regs.group(0)}"
        assert int(spills.group(1)) <= 16, f"{kernel.op}: {spills.group(0)}"


def test_dw_reduction_compiles_every_dtype(tmp_path):
    for o in ("bf16", "f16", "f32"):
        _compile(ng.DW, "sm_90a", tmp_path, ODTYPE=o)


def _inputs(B=2, S=3, dim=16, device="cpu", dtype=torch.bfloat16):
    return (torch.randn(B, S, dim, dtype=dtype, device=device), torch.randn(S, B, dim, dtype=dtype, device=device),
            torch.randn(dim, dtype=dtype, device=device))


def _forward_fns():
    from linghe.facade.norm import GroupNormGateFunction

    return [ng.group_norm_gate_forward, GroupNormGateFunction.apply]


@pytest.mark.parametrize("fn", _forward_fns())
def test_forward_validation(fn):
    x, gate, w = _inputs()
    bad = [
        ((x.int(), gate, w), TypeError, "x"),
        (([1.0], gate, w), TypeError, "x"),
        ((x[0], gate, w), ValueError, "x"),
        ((x, gate.double(), w), TypeError, "gate"),
        ((x, gate[0], w), ValueError, "gate"),
        ((x, gate, w.int()), TypeError, "weight"),
        ((x, gate, w[:8]), ValueError, "weight"),
        ((x, gate, w[None]), ValueError, "weight"),
        ((x.transpose(0, 1), gate, w), ValueError, "x"),      # [S, B, dim]: wrong layout
        ((x[:, :2], gate, w), ValueError, "x"),
        ((x.reshape(2, 3, 4, 4)[..., :3], gate, w), ValueError, "x"),
        ((x, gate, w, 1e-6, 3), ValueError, "group_size"),   # 16 % 3
        ((x, gate, w, 1e-6, 0), ValueError, "group_size"),
        ((x, gate, w, 1e-6, 2.0), TypeError, "group_size"),
        ((x, gate, w, 1e-6, True), TypeError, "group_size"),
        ((x, gate, w, "1e-6", 4), TypeError, "eps"),
        ((x[:, :, :0], gate[:, :, :0], w[:0]), ValueError, "dim"),
    ]
    for args, exc, name in bad:
        with pytest.raises(exc, match=name):
            fn(*args)
    # Everything else right: CPU tensors are refused, naming the argument.
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        fn(x, gate, w)
    with pytest.raises(ValueError, match="CUDA"):
        fn(x.reshape(2, 3, 4, 4), gate, w, 1e-6, 2)


def test_backward_validation():
    x, gate, w = _inputs()
    grad = torch.randn_like(gate)
    bad = [
        ((grad.int(), x, gate, w), TypeError, "grad"),
        ((None, x, gate, w), TypeError, "grad"),
        ((grad[:2], x, gate, w), ValueError, "grad"),
        ((grad.transpose(0, 1), x, gate, w), ValueError, "grad"),
        ((grad, x, gate, w[:4]), ValueError, "weight"),
        ((grad, x, gate, w, 1e-6, 5), ValueError, "group_size"),
    ]
    for args, exc, name in bad:
        with pytest.raises(exc, match=name):
            ng.group_norm_gate_backward(*args)
    with pytest.raises(ValueError, match="grad must be a CUDA tensor"):
        ng.group_norm_gate_backward(grad, x, gate, w)


def _independent_forward(x, gate, weight, eps, G):
    """Per-token, per-group loops in float64 (no reshape tricks), for checking the reference."""
    B, S, dim = x.shape
    d = dim // G
    out = torch.empty(S, B, dim, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            for k in range(G):
                seg = x[b, s, k * d:(k + 1) * d].double()
                r = 1.0 / torch.sqrt((seg * seg).sum() / d + eps)
                out[s, b, k * d:(k + 1) * d] = (seg * r * weight[k * d:(k + 1) * d].double()
                                                * torch.sigmoid(gate[s, b, k * d:(k + 1) * d].double()))
    return out


def _closed_form_backward(grad, x, gate, weight, eps, G):
    """SPEC.md §4.13's gradient formulas (what the kernels compute), in float64."""
    S, B, dim = gate.shape
    d = dim // G
    xg = x.double().reshape(B, S, G, d)
    r = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    sg = torch.sigmoid(gate.double()).transpose(0, 1).reshape(B, S, G, d)
    gr = grad.double().transpose(0, 1).reshape(B, S, G, d)
    w = weight.double().reshape(G, d)
    gh = gr * sg
    dx = r * w * gh - (r ** 3 / d) * xg * (xg * w * gh).sum(-1, keepdim=True)
    dgate = gr * (xg * r * w) * sg * (1 - sg)
    dw = (xg * r * gh).sum((0, 1)).reshape(dim)
    return dx.reshape(x.shape), dgate.reshape(B, S, dim).transpose(0, 1), dw


@pytest.mark.parametrize("B,S,dim,G", [(2, 3, 16, 4), (1, 5, 12, 3), (3, 2, 24, 1), (2, 2, 40, 8)])
def test_reference_against_independent_formulations(B, S, dim, G):
    x = torch.randn(B, S, dim, dtype=torch.float64)
    gate = torch.randn(S, B, dim, dtype=torch.float64) * 2
    w = torch.randn(dim, dtype=torch.float64)
    grad = torch.randn(S, B, dim, dtype=torch.float64)
    out = ref_group_norm_gate(x, gate, w, 1e-6, G)
    torch.testing.assert_close(out, _independent_forward(x, gate, w, 1e-6, G), rtol=1e-12, atol=1e-12)
    got = ref_group_norm_gate_backward(grad, x, gate, w, 1e-6, G)
    want = _closed_form_backward(grad, x, gate, w, 1e-6, G)
    for name, a, b in zip(("dx", "dgate", "dweight"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    # 4-D x gives the same values and a 4-D dx.
    got4 = ref_group_norm_gate_backward(grad, x.reshape(B, S, 2, dim // 2), gate, w, 1e-6, G)
    assert got4[0].shape == (B, S, 2, dim // 2)
    torch.testing.assert_close(got4[0].reshape(B, S, dim), got[0])


# ---------------------------------------------------------------- GPU

def _poison_allocator(nbytes):
    """Fill freed caching-allocator memory with NaN bytes, so outputs allocated next start as NaN."""
    junk = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
    del junk


DT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _case(B, S, dim, dtypes=("bf16", "bf16", "bf16", "bf16"), seed=0):
    xd, gd, wd, dd = (DT[t] for t in dtypes)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, S, dim, device="cuda", generator=gen).mul_(1.5).to(xd)
    gate = torch.randn(S, B, dim, device="cuda", generator=gen).mul_(2).to(gd)
    w = (torch.randn(dim, device="cuda", generator=gen) * 0.5 + 1).to(wd)
    grad = torch.randn(S, B, dim, device="cuda", generator=gen).to(dd)
    return x, gate, w, grad


def _check(name, got, want, like):
    assert got.shape == like.shape and got.dtype == like.dtype and got.device == like.device, \
        f"{name}: {tuple(got.shape)} {got.dtype} {got.device}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries (unwritten?)"
    r = rel(got, want)
    assert r <= TOL, f"{name}: rel {r:.2e} > {TOL}"


def _run_and_check(x, gate, w, grad, eps, G):
    _poison_allocator(8 * (x.numel() + gate.numel()) + (1 << 20))
    out = ng.group_norm_gate_forward(x, gate, w, eps, G)
    dx, dgate, dw = ng.group_norm_gate_backward(grad, x, gate, w, eps, G)
    torch.cuda.synchronize()
    ref = ref_group_norm_gate(x, gate, w, eps, G)
    S, B, dim = gate.shape
    _check("out", out, ref, torch.empty((S, B, dim), dtype=x.dtype, device=x.device))
    torch.testing.assert_close(out.double(), ref, rtol=1.6e-2, atol=1e-2)
    rdx, rdgate, rdw = ref_group_norm_gate_backward(grad, x, gate, w, eps, G)
    _check("dx", dx, rdx, x)
    _check("dgate", dgate, rdgate, gate)
    _check("dweight", dw, rdw, w)
    return out, dx, dgate, dw


GPU_SHAPES = [  # (B, S, dim, G, dtypes (x, gate, weight, grad))
    (2, 4096, 2048, 4, ("bf16",) * 4),               # the benchmark shape
    (1, 4096, 4096, 4, ("bf16",) * 4),               # Triton-linghe's second test
    (1, 60, 1536, 4, ("bf16",) * 4),                 # S % 8 != 0 (Triton-linghe's wrong backward)
    (3, 60, 1536, 8, ("bf16",) * 4),
    (3, 60, 2048, 1, ("bf16", "bf16", "f32", "bf16")),
    (1, 60, 2048, 2, ("bf16",) * 4),
    (2, 37, 2048, 8, ("f16",) * 4),
    (1, 1, 2048, 4, ("bf16",) * 4),                  # one token
    (1, 9, 16384, 1, ("bf16",) * 4),                 # d = 16384: shared-memory group sums
    (2, 5, 16384, 8, ("bf16", "bf16", "f32", "bf16")),
    (3, 60, 1000, 8, ("bf16",) * 4),                 # d = 125: scalar vectors
    (2, 7, 1544, 4, ("bf16",) * 4),                  # d = 386: 2-element vectors
    (2, 7, 1552, 4, ("bf16",) * 4),                  # d = 388: 4-element vectors
    (2, 3, 24, 8, ("bf16",) * 4),                    # d = 3, tiny dim
    (2, 50, 96, 3, ("bf16",) * 4),                   # G = 3: padding threads
    (1, 4, 4096, 2048, ("f32",) * 4),                # d = 2: two passes over groups
    (2, 60, 1536, 4, ("f32",) * 4),
    (1, 60, 2048, 4, ("f16", "bf16", "f32", "f32")),  # mixed dtypes
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,dim,G,dtypes", GPU_SHAPES)
def test_forward_backward_match_reference(B, S, dim, G, dtypes):
    x, gate, w, grad = _case(B, S, dim, dtypes, seed=B * 1000 + S + dim + G)
    _run_and_check(x, gate, w, grad, 1e-6, G)


@pytest.mark.gpu
def test_autograd_function_4d_x_and_grads():
    from linghe.facade.norm import GroupNormGateFunction

    B, S, H, hd, G = 2, 60, 16, 128, 4
    x, gate, w, grad = _case(B, S, H * hd, seed=7)
    x4 = x.reshape(B, S, H, hd).clone().requires_grad_(True)
    g = gate.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    out = GroupNormGateFunction.apply(x4, g, wr, 1e-5, G)
    out.backward(grad)
    ref = ref_group_norm_gate(x4.detach(), gate, w, 1e-5, G)
    _check("out", out.detach(), ref, torch.empty_like(gate))
    rdx, rdg, rdw = ref_group_norm_gate_backward(grad, x4.detach(), gate, w, 1e-5, G)
    _check("dx", x4.grad, rdx, x4.detach())
    _check("dgate", g.grad, rdg, gate)
    _check("dweight", wr.grad, rdw, w)
    # Defaults (eps=1e-6, group_size=4) through apply with three arguments.
    out2 = GroupNormGateFunction.apply(x, gate, w)
    _check("out (defaults)", out2, ref_group_norm_gate(x, gate, w), torch.empty_like(gate))


@pytest.mark.gpu
def test_noncontiguous_misaligned_and_expanded_inputs():
    B, S, dim, G = 3, 60, 1536, 4
    x, gate, w, grad = _case(B, S, dim, seed=11)
    x_nc = torch.cat([x, x], dim=-1)[..., :dim]                 # strided rows
    gate_nc = gate.transpose(0, 1).contiguous().transpose(0, 1)  # [S, B, dim] view of [B, S, dim] storage
    flat = torch.empty(w.numel() + 1, dtype=w.dtype, device="cuda")
    flat[1:] = w
    w_mis = flat[1:]                                             # base 2 bytes off 16-byte alignment
    grad_exp = grad[:1, :1].expand(S, B, dim)                    # stride-0 gradient
    before = [t.clone() for t in (x_nc, gate_nc, w_mis, grad_exp)]
    _run_and_check(x_nc, gate_nc, w_mis, grad_exp, 1e-6, G)
    for t, b in zip((x_nc, gate_nc, w_mis, grad_exp), before):
        assert torch.equal(t, b), "an input was modified"


@pytest.mark.gpu
def test_dweight_is_deterministic():
    x, gate, w, grad = _case(2, 4096, 2048, seed=3)
    first = ng.group_norm_gate_backward(grad, x, gate, w, 1e-6, 4)
    for _ in range(3):
        again = ng.group_norm_gate_backward(grad, x, gate, w, 1e-6, 4)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(0, 5), (2, 0)])
def test_empty_inputs(B, S):
    x, gate, w, grad = _case(max(B, 1), max(S, 1), 256)
    x, gate, grad = x[:B, :S], gate[:S, :B], grad[:S, :B]
    out = ng.group_norm_gate_forward(x, gate, w)
    assert out.shape == (S, B, 256) and out.dtype == x.dtype
    dx, dgate, dw = ng.group_norm_gate_backward(grad, x, gate, w)
    assert dx.shape == x.shape and dgate.shape == gate.shape
    assert dw.shape == (256,) and dw.dtype == w.dtype and not dw.any()


@pytest.mark.gpu
def test_cuda_graph_capture():
    x, gate, w, grad = _case(2, 60, 2048, seed=5)
    ng.group_norm_gate_forward(x, gate, w)              # compile and load before capture
    ng.group_norm_gate_backward(grad, x, gate, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ng.group_norm_gate_forward(x, gate, w)
        dx, dgate, dw = ng.group_norm_gate_backward(grad, x, gate, w)
    x.copy_(torch.randn_like(x))                        # new data, same buffers
    graph.replay()
    torch.cuda.synchronize()
    _check("out", out, ref_group_norm_gate(x, gate, w), out)
    rdx, rdg, rdw = ref_group_norm_gate_backward(grad, x, gate, w)
    _check("dx", dx, rdx, x)
    _check("dweight", dw, rdw, w)
