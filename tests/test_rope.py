"""QK RMSNorm + half RoPE (SPEC.md §4.2): CPU checks and GPU correctness of forward and backward."""
import math

import pytest
import torch

from helpers import rel
from linghe import presets
from linghe.cache import DiskCache
from linghe.facade.rope import QkNormHalfRopeFunction
from linghe.kernel import prewarm_specs
from linghe.reference.rope import ref_qk_norm_half_rope, ref_qk_norm_half_rope_backward
from linghe.utils.rope import (ROPE_BWD, ROPE_FWD, ROPE_WGRAD, _plan, qk_norm_half_rope_backward,
                               qk_norm_half_rope_forward)

OURS = (ROPE_FWD, ROPE_BWD, ROPE_WGRAD)


# ---------------------------------------------------------------- CPU -------
@pytest.mark.parametrize("preset", ["moe-2048", "moe-7168"])
def test_every_preset_specialisation_compiles(tmp_path, preset):
    specs = [(k, s) for k, s in prewarm_specs(presets.get(preset), "sm_90a") if k in OURS]
    assert len(specs) == 6  # fwd, bwd, weight-grad reduction, for model-dtype and fp32 norm weights
    disk = DiskCache(tmp_path)
    for kernel, spec in specs:
        entry, compiled = kernel.build(spec, disk)
        assert compiled and entry.cubin[:4] == b"\x7fELF"


EDGE_SPECS = [  # (H, h, D, dtype, grad dtype, weight dtype): head dims, H == h, passes > 1, narrow vectors
    (16, 16, 64, "bf16", "bf16", "bf16"),
    (16, 4, 192, "bf16", "bf16", "f32"),
    (8, 2, 256, "f16", "f16", "f16"),
    (16, 4, 192, "f32", "f32", "f32"),
    (128, 8, 128, "bf16", "bf16", "bf16"),
    (3, 1, 12, "f16", "f32", "bf16"),
    (2, 1, 32, "bf16", "bf16", "bf16"),
]


@pytest.mark.parametrize("H, h, D, dtype, gdtype, wdtype", EDGE_SPECS)
def test_edge_specialisations_compile(tmp_path, H, h, D, dtype, gdtype, wdtype):
    disk = DiskCache(tmp_path)
    for kernel, consts in ((ROPE_FWD, dict(H=H, HKV=h, D=D, DTYPE=dtype, QWDTYPE=wdtype, KWDTYPE="f32")),
                           (ROPE_BWD, dict(H=H, HKV=h, D=D, DTYPE=dtype, GDTYPE=gdtype, QWDTYPE=wdtype,
                                           KWDTYPE="f32"))):
        entry, _ = kernel.build(kernel.spec("sm_90a", **consts), disk)
        assert entry.cubin[:4] == b"\x7fELF"


def test_compiles_for_sm80(tmp_path):
    disk = DiskCache(tmp_path)
    for kernel, consts in ((ROPE_FWD, dict(H=16, HKV=4, D=128, DTYPE="bf16", QWDTYPE="bf16", KWDTYPE="bf16")),
                           (ROPE_BWD, dict(H=16, HKV=4, D=128, DTYPE="bf16", GDTYPE="bf16", QWDTYPE="bf16",
                                           KWDTYPE="bf16")),
                           (ROPE_WGRAD, dict(D=128, QWDTYPE="bf16", KWDTYPE="bf16"))):
        entry, _ = kernel.build(kernel.spec("sm_80", **consts), disk)
        assert entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("H, h, D, esize, vec_bytes", [
    (16, 4, 128, 2, 16), (16, 4, 128, 2, 8), (16, 16, 64, 2, 16), (16, 4, 192, 2, 16), (16, 4, 192, 4, 8),
    (8, 2, 256, 4, 16), (128, 8, 128, 2, 16), (64, 32, 128, 2, 8), (3, 1, 12, 2, 16), (2, 1, 32, 2, 16),
    (1, 1, 4, 4, 8),
])
def test_thread_layout_covers_every_lane(H, h, D, esize, vec_bytes):
    p = _plan(H, h, D, esize, vec_bytes)
    assert (D // 4) % p["VEC"] == 0 and p["VEC"] * esize <= vec_bytes
    assert p["T"] * p["VEC"] == D // 4 and p["T"] <= p["TP"] <= 32 and 32 % p["TP"] == 0
    assert p["NT"] % 32 == 0 and p["NT"] <= 512 and p["SP"] * p["TP"] <= p["NT"]
    assert p["SP"] * p["PASSES"] >= H + 2 * h > p["SP"] * (p["PASSES"] - 1)
    # Replay rope.cuh's Item (thread -> head slot, kind, head, lanes): every lane of every slot is
    # covered exactly once, and kinds/heads follow SPEC's slot formulas.
    w, d4, vec = H // h, D // 4, p["VEC"]
    want = {}
    for j in range(H):
        want[j + 2 * (j // w)] = ("q", j)
    for g in range(h):
        want[g * (w + 2) + w] = ("k", g)
        want[g * (w + 2) + w + 1] = ("v", g)
    seen = {}
    for pass_ in range(p["PASSES"]):
        for tid in range(p["NT"]):
            local, t = divmod(tid, p["TP"])
            slot = pass_ * p["SP"] + local
            if not (local < p["SP"] and slot < H + 2 * h and t < p["T"]):
                continue
            grp, r = divmod(slot, w + 2)
            kind, head = ("q", grp * w + r) if r < w else (("k", grp) if r == w else ("v", grp))
            assert want[slot] == (kind, head)
            for qt in range(4):
                for i in range(vec):
                    lane = qt * d4 + t * vec + i
                    assert (slot, lane) not in seen
                    seen[slot, lane] = True
    assert len(seen) == (H + 2 * h) * D


def _cpu_inputs(S=3, B=2, H=4, h=2, D=16):
    qkv = torch.randn(S, B, (H + 2 * h) * D, dtype=torch.bfloat16)
    return qkv, torch.randn(D, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16), torch.randn(S, D // 2)


def _fwd_args(**change):
    qkv, qw, kw, f = _cpu_inputs()
    args = dict(qkv=qkv, q_norm_weight=qw, k_norm_weight=kw, freqs=f, H=4, h=2, eps=1e-6)
    args.update(change)
    return args


@pytest.mark.parametrize("change, exc, word", [
    (dict(qkv=[1.0]), TypeError, "qkv"),
    (dict(qkv=torch.randn(6, 128)), ValueError, "qkv"),
    (dict(qkv=torch.randn(3, 2, 128).int()), TypeError, "qkv"),
    (dict(qkv=torch.randn(3, 2, 129, dtype=torch.bfloat16)), ValueError, "qkv"),      # dim != (H+2h)*D
    (dict(qkv=torch.randn(3, 2, 48, dtype=torch.bfloat16), H=4, h=2), ValueError, "head_dim"),  # D = 6
    (dict(qkv=torch.randn(3, 2, 5 * 2048, dtype=torch.bfloat16), H=3, h=1,
          q_norm_weight=torch.randn(2048), k_norm_weight=torch.randn(2048), freqs=torch.randn(3, 1024)),
     ValueError, "head_dim"),                                                          # too large
    (dict(H=3, h=2), ValueError, "H"),
    (dict(H=4.0), TypeError, "H"),
    (dict(h=True), TypeError, "h"),
    (dict(h=0), ValueError, "h"),
    (dict(q_norm_weight=torch.randn(8)), ValueError, "q_norm_weight"),
    (dict(q_norm_weight=torch.randn(2, 16)), ValueError, "q_norm_weight"),
    (dict(k_norm_weight=torch.ones(16, dtype=torch.int32)), TypeError, "k_norm_weight"),
    (dict(freqs=torch.randn(3, 16)), ValueError, "freqs"),
    (dict(freqs=torch.randn(4, 8)), ValueError, "freqs"),
    (dict(freqs=torch.randn(24)), ValueError, "freqs"),
    (dict(freqs=torch.randn(3, 8, dtype=torch.bfloat16)), TypeError, "freqs"),
    (dict(eps="small"), TypeError, "eps"),
    (dict(), ValueError, "CUDA"),
])
def test_forward_bad_input_is_named(change, exc, word):
    with pytest.raises(exc, match=word):
        qk_norm_half_rope_forward(**_fwd_args(**change))


def _bwd_args(**change):
    qkv, qw, kw, f = _cpu_inputs()
    args = dict(grad_q=torch.randn(2, 3, 4, 16, dtype=torch.bfloat16),
                grad_k=torch.randn(2, 3, 2, 16, dtype=torch.bfloat16),
                grad_v=torch.randn(2, 3, 2, 16, dtype=torch.bfloat16),
                qkv=qkv, q_norm_weight=qw, k_norm_weight=kw, freqs=f, H=4, h=2, eps=1e-6)
    args.update(change)
    return args


@pytest.mark.parametrize("change, exc, word", [
    (dict(grad_q=torch.randn(3, 2, 4, 16, dtype=torch.bfloat16)), ValueError, "grad_q"),  # [S, B] order
    (dict(grad_k=torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)), ValueError, "grad_k"),
    (dict(grad_v=torch.randn(2, 3, 32, dtype=torch.bfloat16)), ValueError, "grad_v"),
    (dict(grad_k=torch.randn(2, 3, 2, 16)), TypeError, "grad_k"),                          # dtype != grad_q's
    (dict(grad_q=torch.randn(2, 3, 4, 16).long()), TypeError, "grad_q"),
    (dict(qkv=torch.randn(3, 2, 130, dtype=torch.bfloat16)), ValueError, "qkv"),
    (dict(freqs=torch.randn(3, 8).double()), TypeError, "freqs"),
    (dict(H=2), ValueError, "qkv"),
    (dict(), ValueError, "CUDA"),
])
def test_backward_bad_input_is_named(change, exc, word):
    with pytest.raises(exc, match=word):
        qk_norm_half_rope_backward(**_bwd_args(**change))


def test_function_validates_too():
    qkv, qw, kw, f = _cpu_inputs()
    with pytest.raises(ValueError, match="CUDA"):
        QkNormHalfRopeFunction.apply(qkv, qw, kw, f, 4, 2)


def _independent_forward(qkv, qw, kw, freqs, H, h, eps):
    """Head by head with SPEC's slot formulas and lane-by-lane rotation, float64."""
    S, B, Dim = qkv.shape
    D, w = Dim // (H + 2 * h), H // h
    d4 = D // 4
    x = qkv.double()
    f = freqs.double()

    def norm_rope(u, wt):
        y = u / torch.sqrt((u * u).mean(-1, keepdim=True) + eps) * wt.double()
        o = y.clone()
        for k in range(d4):
            o[..., k] = y[..., k] * torch.cos(f[:, None, k]) - y[..., k + d4] * torch.sin(f[:, None, k])
            o[..., k + d4] = y[..., k + d4] * torch.cos(f[:, None, k + d4]) + y[..., k] * torch.sin(f[:, None, k + d4])
        return o

    def slot(p):
        return x[:, :, p * D:(p + 1) * D]

    q = torch.stack([norm_rope(slot(j + 2 * (j // w)), qw) for j in range(H)], 2)
    k = torch.stack([norm_rope(slot(g * (w + 2) + w), kw) for g in range(h)], 2)
    v = torch.stack([slot(g * (w + 2) + w + 1) for g in range(h)], 2)
    return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)


@pytest.mark.parametrize("H, h, D", [(4, 2, 16), (3, 3, 8), (6, 1, 24)])
def test_reference_matches_independent_formulation(H, h, D):
    torch.manual_seed(0)
    S, B = 5, 2
    qkv = torch.randn(S, B, (H + 2 * h) * D) * 3
    qw, kw, f = torch.randn(D), torch.randn(D), torch.rand(S, D // 2) * 20 - 10
    for got, want in zip(ref_qk_norm_half_rope(qkv, qw, kw, f, H, h, 1e-5),
                         _independent_forward(qkv, qw, kw, f, H, h, 1e-5)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _spec_backward(gq, gk, gv, qkv, qw, kw, freqs, H, h, eps):
    """SPEC.md §4.2's explicit backward formulas (the ones the kernel implements), float64."""
    S, B, Dim = qkv.shape
    D, w = Dim // (H + 2 * h), H // h
    d4 = D // 4
    t = qkv.double().reshape(S, B, h, w + 2, D)
    c, s = freqs.double().cos()[:, None, None, None, :], freqs.double().sin()[:, None, None, None, :]

    def head_grad(u, g, wt):  # u, g [S, B, h, heads per group, D]
        gh = g.clone()
        gh[..., :d4] = g[..., :d4] * c[..., :d4] + g[..., d4:2 * d4] * s[..., d4:]
        gh[..., d4:2 * d4] = g[..., d4:2 * d4] * c[..., d4:] - g[..., :d4] * s[..., :d4]
        r = torch.rsqrt((u * u).mean(-1, keepdim=True) + eps)
        du = r * wt * gh - r ** 3 / D * u * (u * wt * gh).sum(-1, keepdim=True)
        return du, (u * r * gh).reshape(-1, D).sum(0)

    dq, dqw = head_grad(t[:, :, :, :w], gq.double().transpose(0, 1).reshape(S, B, h, w, D), qw.double())
    dk, dkw = head_grad(t[:, :, :, w:w + 1], gk.double().transpose(0, 1)[:, :, :, None], kw.double())
    dv = gv.double().transpose(0, 1)[:, :, :, None]
    dqkv = torch.cat([dq, dk, dv], 3).reshape(S, B, Dim)
    return dqkv, dqw, dkw


@pytest.mark.parametrize("duplicated", [True, False])
def test_spec_backward_is_the_exact_adjoint(duplicated):
    torch.manual_seed(1)
    S, B, H, h, D = 4, 3, 4, 2, 16
    qkv = torch.randn(S, B, (H + 2 * h) * D, dtype=torch.float64)
    qw, kw = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    f = _freqs(S, D, duplicated, device="cpu")
    gq, gk, gv = torch.randn(B, S, H, D), torch.randn(B, S, h, D), torch.randn(B, S, h, D)
    want = ref_qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, H, h, 1e-6)
    got = _spec_backward(gq, gk, gv, qkv, qw, kw, f, H, h, 1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- GPU -------
def _freqs(S, D, duplicated, device="cuda", base=10000.0):
    """[S, D/2] fp32 angles: the standard duplicated construction, or arbitrary ones."""
    if duplicated:
        inv = base ** (-torch.arange(D // 4, dtype=torch.float64) * 2 / (D // 2))
        f = torch.arange(S, dtype=torch.float64)[:, None] * inv
        return torch.cat([f, f], 1).float().to(device)
    g = torch.Generator(device="cpu").manual_seed(S * 131 + D)
    return ((torch.rand(S, D // 2, generator=g) * 2 - 1) * 3 * math.pi * max(S, 1)).to(device)


def _inputs(S, B, H, h, D, dtype=torch.bfloat16, wdtype=torch.bfloat16, duplicated=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dim = (H + 2 * h) * D
    # Head magnitudes differ so the norm matters.
    scale = torch.rand(S, B, H + 2 * h, 1, device="cuda", generator=g) * 3 + 0.1
    qkv = (torch.randn(S, B, H + 2 * h, D, device="cuda", generator=g) * scale).reshape(S, B, dim).to(dtype)
    qw = (1 + 0.5 * torch.randn(D, device="cuda", generator=g)).to(wdtype)
    kw = (1 + 0.5 * torch.randn(D, device="cuda", generator=g)).to(wdtype)
    return qkv, qw, kw, _freqs(S, D, duplicated)


def _tol(dtype):
    """rel bound of an output of this dtype: SPEC's 5e-3 for 16-bit outputs, tighter for fp32 ones."""
    return 1e-4 if dtype == torch.float32 else 5e-3


def _check_forward(outs, qkv, qw, kw, f, H, h, eps):
    S, B, dim = qkv.shape
    D = dim // (H + 2 * h)
    rq, rk, rv = ref_qk_norm_half_rope(qkv, qw, kw, f, H, h, eps)
    outs = [o.detach() for o in outs]
    for name, got, want, heads in (("q", outs[0], rq, H), ("k", outs[1], rk, h), ("v", outs[2], rv, h)):
        assert got.shape == (B, S, heads, D) and got.is_contiguous() and got.dtype == qkv.dtype, name
        assert got.device == qkv.device
        if name == "v":
            assert torch.equal(got.double(), want), "v must be copied bit for bit"
            continue
        assert torch.isfinite(got).all(), name
        assert rel(got, want) <= _tol(got.dtype), f"{name}: rel {rel(got, want):.2e}"
        if qkv.dtype != torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=1e-2)


def _grads(B, S, H, h, D, dtype, seed, layout="contiguous"):
    g = torch.Generator(device="cuda").manual_seed(seed + 7)
    if layout == "contiguous":
        return tuple(torch.randn(B, S, n, D, device="cuda", generator=g).to(dtype) for n in (H, h, h))
    # Non-contiguous: [S, B] storage transposed, a slice of a wider tensor, and an expanded batch.
    gq = torch.randn(S, B, H, D, device="cuda", generator=g).to(dtype).transpose(0, 1)
    gk = torch.randn(B, S, h, D + 8, device="cuda", generator=g).to(dtype)[..., 8:]
    gv = torch.randn(1, S, h, D, device="cuda", generator=g).to(dtype).expand(B, S, h, D)
    return gq, gk, gv


def _check_backward(got, gq, gk, gv, qkv, qw, kw, f, H, h, eps):
    dqkv, dqw, dkw = got
    want = ref_qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, H, h, eps)
    S, B, dim = qkv.shape
    assert dqkv.shape == (S, B, dim) and dqkv.is_contiguous() and dqkv.dtype == gq.dtype
    assert dqw.shape == qw.shape and dqw.dtype == qw.dtype and dkw.dtype == kw.dtype
    for name, a, b in (("dqkv", dqkv, want[0]), ("dq_w", dqw, want[1]), ("dk_w", dkw, want[2])):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= _tol(a.dtype), f"{name}: rel {rel(a, b):.2e}"
    # dv is grad_v copied bit for bit into the v slots
    w = H // h
    D = dim // (H + 2 * h)
    dv = dqkv.reshape(S, B, h, w + 2, D)[:, :, :, w + 1]
    assert torch.equal(dv, gv.transpose(0, 1))


SHAPES = [  # S, B, H, h, D
    (4096, 2, 16, 4, 128),   # the benchmark shape
    (1, 1, 1, 1, 64),        # smallest, H == h
    (7, 3, 16, 16, 128),     # H == h
    (33, 2, 8, 2, 192),      # D = 192: D/4 = 48, D/2 = 96
    (17, 5, 4, 1, 256),
    (129, 1, 32, 8, 64),
    (3, 2, 64, 32, 128),     # dim = 16384 in one CTA per token
    (5, 2, 96, 8, 128),      # dim = 14336
    (4, 3, 128, 8, 128),     # dim = 18432: two passes of head slots
    (6, 2, 2, 1, 32),        # one thread per head
]


@pytest.mark.gpu
@pytest.mark.parametrize("S, B, H, h, D", SHAPES)
@pytest.mark.parametrize("duplicated", [True, False])
def test_forward_and_backward_through_autograd(S, B, H, h, D, duplicated):
    eps = 1e-6
    qkv, qw, kw, f = _inputs(S, B, H, h, D, duplicated=duplicated, seed=S + B + D)
    x, wq, wk = (t.detach().clone().requires_grad_(True) for t in (qkv, qw, kw))
    outs = QkNormHalfRopeFunction.apply(x, wq, wk, f, H, h, eps)
    _check_forward(outs, qkv, qw, kw, f, H, h, eps)
    gq, gk, gv = _grads(B, S, H, h, D, qkv.dtype, seed=S * B)
    torch.autograd.backward(outs, (gq, gk, gv))
    _check_backward((x.grad, wq.grad, wk.grad), gq, gk, gv, qkv, qw, kw, f, H, h, eps)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, wdtype, D", [(torch.float32, torch.float32, 128), (torch.float32, torch.bfloat16, 192),
                                              (torch.float16, torch.float32, 256), (torch.float16, torch.float16, 64),
                                              (torch.bfloat16, torch.float32, 128), (torch.float32, torch.float32, 256)])
@pytest.mark.parametrize("duplicated", [True, False])
def test_other_dtypes(dtype, wdtype, D, duplicated):
    S, B, H, h, eps = 37, 3, 16, 4, 1e-5
    qkv, qw, kw, f = _inputs(S, B, H, h, D, dtype, wdtype, duplicated, seed=D)
    outs = qk_norm_half_rope_forward(qkv, qw, kw, f, H, h, eps)
    _check_forward(outs, qkv, qw, kw, f, H, h, eps)
    gq, gk, gv = _grads(B, S, H, h, D, dtype, seed=D)
    got = qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, H, h, eps)
    _check_backward(got, gq, gk, gv, qkv, qw, kw, f, H, h, eps)


@pytest.mark.gpu
def test_forward_weights_mixed_dtypes_and_offset_views():
    # The forward reads the norm weights as 16-byte vectors: q and k weights of different dtypes, and
    # weights that are views off 16-byte alignment (copied first), give the reference's results.
    S, B, H, h, D, eps = 21, 3, 8, 2, 64, 1e-6
    qkv, qw, _, f = _inputs(S, B, H, h, D, seed=31)
    kw = (1 + 0.5 * torch.randn(D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)))
    outs = qk_norm_half_rope_forward(qkv, qw, kw, f, H, h, eps)  # bf16 q weights, fp32 k weights
    _check_forward(outs, qkv, qw, kw, f, H, h, eps)
    qw_off = torch.cat([qw[:1], qw])[1:]
    kw_off = torch.cat([kw[:1], kw])[1:]
    assert qw_off.data_ptr() % 16 and kw_off.data_ptr() % 16
    for a, b in zip(qk_norm_half_rope_forward(qkv, qw_off, kw_off, f, H, h, eps), outs):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_narrow_vectors_and_mixed_grad_dtype():
    # D = 12: D/4 = 3 lanes, so 2-byte scalar vectors; fp32 grads with an fp16 qkv.
    S, B, H, h, D, eps = 9, 2, 3, 1, 12, 1e-6
    qkv, qw, kw, f = _inputs(S, B, H, h, D, torch.float16, torch.bfloat16, duplicated=False, seed=12)
    outs = qk_norm_half_rope_forward(qkv, qw, kw, f, H, h, eps)
    _check_forward(outs, qkv, qw, kw, f, H, h, eps)
    gq, gk, gv = _grads(B, S, H, h, D, torch.float32, seed=3)
    got = qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, H, h, eps)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    _check_backward(got, gq, gk, gv, qkv, qw, kw, f, H, h, eps)


@pytest.mark.gpu
@pytest.mark.parametrize("duplicated", [True, False])
def test_strided_qkv_and_noncontiguous_grads(duplicated):
    S, B, H, h, D, eps = 300, 2, 16, 4, 128, 1e-6
    qkv, qw, kw, f = _inputs(S, B, H, h, D, duplicated=duplicated, seed=4)
    dim = qkv.shape[2]
    # qkv as a column slice of a wider leaf (stride(1) > dim): dqkv must land in the slice only.
    leaf = torch.cat([qkv, torch.ones(S, B, 256, dtype=qkv.dtype, device="cuda")], 2).requires_grad_(True)
    view = leaf[..., :dim]
    assert view.stride(1) == dim + 256
    outs = QkNormHalfRopeFunction.apply(view, qw, kw, f, H, h, eps)
    _check_forward(outs, qkv, qw, kw, f, H, h, eps)
    gq, gk, gv = _grads(B, S, H, h, D, qkv.dtype, seed=5, layout="strided")
    assert not (gq.is_contiguous() or gk.is_contiguous() or gv.is_contiguous())
    torch.autograd.backward(outs, (gq, gk, gv))
    assert torch.equal(leaf.grad[..., dim:], torch.zeros_like(leaf.grad[..., dim:]))
    _check_backward((leaf.grad[..., :dim].contiguous(), *qk_norm_half_rope_backward(
        gq, gk, gv, view, qw, kw, f, H, h, eps)[1:]), gq, gk, gv, qkv, qw, kw, f, H, h, eps)
    # A misaligned slice (odd column offset) is copied before the launch and gives the same numbers.
    odd = torch.cat([qkv[..., :1], qkv], 2)[..., 1:]
    assert odd.data_ptr() % 16
    for a, b in zip(qk_norm_half_rope_forward(odd, qw, kw, f, H, h, eps), outs):
        assert torch.equal(a, b)
    got = qk_norm_half_rope_backward(gq, gk, gv, odd, qw, kw, f, H, h, eps)
    plain = qk_norm_half_rope_backward(gq.contiguous(), gk.contiguous(), gv.contiguous(), qkv, qw, kw, f, H, h, eps)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_inputs_untouched_and_backward_deterministic():
    S, B, H, h, D, eps = 1000, 2, 16, 4, 128, 1e-6
    qkv, qw, kw, f = _inputs(S, B, H, h, D, duplicated=False, seed=8)
    gq, gk, gv = _grads(B, S, H, h, D, qkv.dtype, seed=8)
    before = [t.clone() for t in (qkv, qw, kw, f, gq, gk, gv)]
    qk_norm_half_rope_forward(qkv, qw, kw, f, H, h, eps)
    first = qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, H, h, eps)
    for _ in range(3):
        again = qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, H, h, eps)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "backward must be bitwise reproducible"
    for a, b in zip(before, (qkv, qw, kw, f, gq, gk, gv)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_empty_tokens():
    H, h, D = 16, 4, 128
    qkv, qw, kw, f = _inputs(1, 2, H, h, D)
    q, k, v = qk_norm_half_rope_forward(qkv[:0], qw, kw, f[:0], H, h)
    assert q.shape == (2, 0, H, D) and k.shape == (2, 0, h, D) and v.shape == (2, 0, h, D)
    gq, gk, gv = (torch.empty(2, 0, n, D, device="cuda", dtype=qkv.dtype) for n in (H, h, h))
    dqkv, dqw, dkw = qk_norm_half_rope_backward(gq, gk, gv, qkv[:0], qw, kw, f[:0], H, h)
    assert dqkv.shape == (0, 2, (H + 2 * h) * D)
    assert torch.equal(dqw, torch.zeros_like(qw)) and torch.equal(dkw, torch.zeros_like(kw))


@pytest.mark.gpu
def test_default_heads_and_cuda_graph_capture():
    S, B, D, eps = 64, 2, 128, 1e-6
    H, h = 32, 4  # the defaults
    qkv, qw, kw, f = _inputs(S, B, H, h, D, seed=21)
    gq, gk, gv = _grads(B, S, H, h, D, qkv.dtype, seed=21)
    outs = QkNormHalfRopeFunction.apply(qkv, qw, kw, f)  # H, h, eps omitted
    _check_forward(outs, qkv, qw, kw, f, H, h, eps)
    qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f)  # compile and load outside the capture
    static = [t.clone() for t in (qkv, gq, gk, gv)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fwd = qk_norm_half_rope_forward(static[0], qw, kw, f)
        bwd = qk_norm_half_rope_backward(static[1], static[2], static[3], static[0], qw, kw, f)
    qkv2, _, _, _ = _inputs(S, B, H, h, D, seed=22)
    g2 = _grads(B, S, H, h, D, qkv.dtype, seed=22)
    for dst, src in zip(static, (qkv2, *g2)):
        dst.copy_(src)
    for t in (*fwd, *bwd):
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _check_forward(fwd, qkv2, qw, kw, f, H, h, eps)
    _check_backward(bwd, *g2, qkv2, qw, kw, f, H, h, eps)
