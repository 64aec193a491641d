"""Softmax cross entropy (SPEC.md §4.10): kernels vs linghe.reference, validation, compilation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import preset_constants, rel
from linghe.cache import DiskCache
from linghe.facade.loss import SoftmaxCrossEntropyFunction as CE
from linghe.reference.loss import ref_cross_entropy, ref_cross_entropy_grad
from linghe.utils import loss as L
from linghe.utils.loss import softmax_cross_entropy_backward as ce_bwd
from linghe.utils.loss import softmax_cross_entropy_forward as ce_fwd

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
GRAD_TOL = {BF16: 4e-3, F16: 1e-3, F32: 2e-5}


# ---- CPU: compilation --------------------------------------------------------------------------
def _prewarm_constants():
    return preset_constants(L._prewarm)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_prewarm_specs_compile(tmp_path, arch):
    specs = _prewarm_constants()
    assert specs, "no prewarm specs"
    for kernel, constants in specs:
        entry, _ = kernel.build(kernel.spec(arch, **constants), DiskCache(tmp_path))
        assert entry.cubin


@pytest.mark.parametrize("kernel,constants", [
    (L.CE_FORWARD, dict(DTYPE="f16", LABEL="i32", TPR=32)),
    (L.CE_FORWARD, dict(DTYPE="f32", LABEL="i64", TPR=128)),
    (L.CE_BACKWARD, dict(DTYPE="f32", LABEL="i64", GDTYPE="f64", TPR=32)),
    (L.CE_BACKWARD, dict(DTYPE="f16", LABEL="i32", GDTYPE="bf16", TPR=256)),
    (L.CE_BACKWARD, dict(DTYPE="bf16", LABEL="i64", GDTYPE="f16", TPR=64)),
])
def test_other_specs_compile(tmp_path, kernel, constants):
    entry, _ = kernel.build(kernel.spec("sm_90a", **constants), DiskCache(tmp_path))
    assert entry.cubin


def test_render_names_entry():
    for kernel, constants in _prewarm_constants():
        source = kernel.render(kernel.spec("sm_90a", **constants))
        assert 'extern "C" __global__' in source and kernel.entry in source


def test_threads_per_row():
    assert L.threads_per_row(157184, "bf16") == 512
    assert L.threads_per_row(262144, "f32") == 512
    assert L.threads_per_row(128, "bf16") == 32
    assert L.threads_per_row(1, "f32") == 32
    assert L.threads_per_row(4096, "bf16") == 128


# ---- CPU: validation (types, ranks, shapes before devices) -------------------------------------
def _cpu(M=6, V=10, dtype=BF16):
    return torch.randn(M, V).to(dtype), torch.randint(0, V, (M,))


@pytest.mark.parametrize("fn", ["function", "plain"])
def test_validation_forward(fn):
    call = (lambda x, y, *a: CE.apply(x, y, *a)) if fn == "function" else (lambda x, y, *a: ce_fwd(x, y))
    x, y = _cpu()
    with pytest.raises(TypeError, match="logits"):
        call([1.0], y)
    with pytest.raises(TypeError, match="logits"):
        call(x.to(torch.int32), y)
    with pytest.raises(ValueError, match="logits"):
        call(x[0], y)
    with pytest.raises(ValueError, match="logits"):
        call(x.reshape(1, 2, 3, 10), y)
    with pytest.raises(ValueError, match="logits"):
        call(torch.randn(6, 0), y)
    with pytest.raises(TypeError, match="labels"):
        call(x, y.float())
    with pytest.raises(TypeError, match="labels"):
        call(x, y.to(torch.int16))
    with pytest.raises(TypeError, match="labels"):
        call(x, "labels")
    with pytest.raises(ValueError, match="labels"):
        call(x, y[:5])
    with pytest.raises(ValueError, match="labels"):
        call(x, y.reshape(2, 3))  # 2-D labels need 3-D logits
    with pytest.raises(ValueError, match="labels"):
        call(x.reshape(2, 3, 10), y.reshape(3, 2))
    with pytest.raises(ValueError, match="CUDA"):
        call(x, y)  # every shape is right: now the device check speaks


def test_validation_inplace():
    x, y = _cpu()
    with pytest.raises(ValueError, match="logits must be contiguous"):
        CE.apply(x.t().contiguous().t(), y, True)
    with pytest.raises(TypeError, match="inplace"):
        CE.apply(x, y, -100)  # the later revision's ignore_index in the third slot
    with pytest.raises(ValueError, match="CUDA"):
        CE.apply(x.t().contiguous().t(), y, False)  # non-contiguous is fine without inplace
    stats = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="logits must be contiguous"):
        ce_bwd(x.t().contiguous().t(), y, stats, torch.ones(6), True)


def test_validation_backward():
    x, y = _cpu()
    stats, g = torch.zeros(6, 2), torch.ones(6)
    with pytest.raises(ValueError, match="stats"):
        ce_bwd(x, y, torch.zeros(6), g)
    with pytest.raises(TypeError, match="stats"):
        ce_bwd(x, y, stats.double(), g)
    with pytest.raises(ValueError, match="stats"):
        ce_bwd(x, y, torch.zeros(2, 6).t(), g)
    with pytest.raises(ValueError, match="grad_output"):
        ce_bwd(x, y, stats, torch.ones(5))
    with pytest.raises(TypeError, match="grad_output"):
        ce_bwd(x, y, stats, torch.ones(6, dtype=torch.int32))
    with pytest.raises(ValueError, match="labels"):
        ce_bwd(x, y[:3], stats, g)
    with pytest.raises(ValueError, match="CUDA"):
        ce_bwd(x, y, stats, g.expand(6))


# ---- CPU: the reference against an independent formulation -------------------------------------
def test_reference_matches_torch():
    torch.manual_seed(0)
    M, V = 40, 33
    x = torch.randn(M, V, dtype=torch.float64) * 3
    y = torch.randint(0, V, (M,))
    y[3] = -100
    y[7] = V + 2
    g = torch.randn(M, dtype=torch.float64)
    loss = ref_cross_entropy(x, y)
    valid = (y >= 0) & (y < V)
    want = F.cross_entropy(x[valid], y[valid], reduction="none")
    torch.testing.assert_close(loss[valid], want)
    assert loss[3] == 0 and torch.isnan(loss[7])
    xr = x.clone().requires_grad_()
    (F.cross_entropy(xr[valid], y[valid], reduction="none") * g[valid]).sum().backward()
    grad = ref_cross_entropy_grad(x, y, g)
    torch.testing.assert_close(grad[valid], xr.grad[valid])
    assert (grad[3] == 0).all() and torch.isnan(grad[7]).all()
    # 3-D shapes round-trip
    assert ref_cross_entropy(x.reshape(4, 10, V), y.reshape(4, 10)).shape == (4, 10)
    assert ref_cross_entropy_grad(x.reshape(4, 10, V), y.reshape(4, 10), g).shape == (4, 10, V)


# ---- GPU -------------------------------------------------------------------------------------------
def _dirty_allocator(nbytes):
    """Leave NaN-filled blocks in torch's caching allocator, so outputs not written show up."""
    if nbytes > 0:
        torch.empty(nbytes // 4 + 64, dtype=torch.float32, device="cuda").fill_(float("nan"))


def _inputs(M, V, dtype, scale=1.0, label_dtype=torch.int64, special=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(M, V, device="cuda", generator=gen) * scale).to(dtype)
    k = min(16, V)  # labels among each row's top-16 logits (as the Triton-linghe tests)
    top = x.float().topk(k, dim=-1).indices
    pick = torch.randint(0, k, (M, 1), device="cuda", generator=gen)
    y = top.gather(1, pick)[:, 0]
    if M >= 8:
        y[::5] = torch.randint(0, V, (y[::5].numel(),), device="cuda", generator=gen)  # and some anywhere
    if special and M >= 4:
        y[0], y[1], y[2], y[3] = -100, V, -1, V + 12345
    return x, y.to(label_dtype)


def _check_loss(loss, x, y):
    ref = ref_cross_entropy(x, y)
    assert loss.dtype == torch.float32 and loss.shape == y.shape and loss.device == x.device
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)), "NaN rows differ"


def _check_grad(grad, x, y, g, what=""):
    V = x.shape[-1]
    ref = ref_cross_entropy_grad(x, y, g).reshape(-1, V)
    assert grad.shape == x.shape and grad.dtype == x.dtype and grad.device == x.device, what
    got = grad.reshape(-1, V).double()
    lab = y.reshape(-1).long()
    bad, ignored = lab >= V, lab < 0
    assert torch.isnan(got[bad]).all(), f"{what}: label >= V rows must be NaN"
    assert (got[ignored] == 0).all(), f"{what}: ignored rows must be zero"
    ok = ~bad
    assert torch.isfinite(got[ok]).all(), f"{what}: non-finite gradient entries"
    if ok.any() and ref[ok].norm() > 0:
        r = rel(got[ok], ref[ok])
        assert r <= GRAD_TOL[x.dtype], f"{what}: rel {r:.3g} > {GRAD_TOL[x.dtype]}"


SHAPES = [  # (M, V, dtype, scale)
    (256, 157184, BF16, 1.0),
    (256, 157184, BF16, 10.0),
    (128, 157175, BF16, 1.0),  # odd vocab: every row starts at a different alignment
    (64, 157175, F32, 1.0),
    (64, 157175, F16, 1.0),
    (4, 262144, BF16, 1.0),
    (300, 4097, BF16, 2.0),
    (200, 128, BF16, 1.0),
    (77, 1000, F32, 3.0),
    (33, 7, BF16, 1.0),
    (9, 1, F32, 1.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,V,dtype,scale", SHAPES)
def test_forward_backward(M, V, dtype, scale):
    x, y = _inputs(M, V, dtype, scale)
    _dirty_allocator(M * V * x.element_size())
    loss, stats = ce_fwd(x, y)
    _check_loss(loss, x, y)
    assert stats.shape == (M, 2) and stats.dtype == torch.float32
    g = torch.randn(M, device="cuda")
    _dirty_allocator(M * V * x.element_size())
    grad = ce_bwd(x, y, stats, g)
    _check_grad(grad, x, y, g, f"{M}x{V} {dtype}")
    assert ce_bwd(x, y, stats, g, True) is x  # in place: the gradient is now in x
    bits = torch.int16 if x.element_size() == 2 else torch.int32
    assert torch.equal(x.view(bits), grad.view(bits)), "inplace and out-of-place gradients differ"


@pytest.mark.gpu
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_label_dtypes(label_dtype):
    x, y = _inputs(64, 5003, BF16, label_dtype=label_dtype)
    loss, stats = ce_fwd(x, y)
    _check_loss(loss, x, y)
    g = torch.rand(64, device="cuda")
    _check_grad(ce_bwd(x, y, stats, g), x, y, g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_extreme_logits(dtype):
    M, V = 64, 50021
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(M, V, device="cuda", generator=gen)
    spikes = torch.rand(M, V, device="cuda", generator=gen)
    x[spikes < 2e-4] = 1e4
    x[spikes > 1 - 2e-4] = -1e4
    x[:8] = torch.randn(8, V, device="cuda", generator=gen) * 1e4      # whole rows at ±1e4 scale
    x[8:16] = -200 + 0.5 * torch.randn(8, V, device="cuda", generator=gen)  # all far below -88
    x = x.to(dtype)
    top = x.float().topk(4, dim=-1).indices
    y = top[:, 0].clone()
    y[1::3] = top[1::3, 3]
    y[2::3] = torch.randint(0, V, (y[2::3].numel(),), device="cuda", generator=gen)
    loss, stats = ce_fwd(x, y)
    _check_loss(loss, x, y)
    assert torch.isfinite(loss).all()
    g = torch.randn(M, device="cuda")
    _check_grad(ce_bwd(x, y, stats, g), x, y, g, "extreme")
    # the -200 rows: each row's gradient on its own, not hidden by the large rows
    _check_grad(ce_bwd(x[8:16], y[8:16], stats[8:16], g[8:16]), x[8:16], y[8:16], g[8:16], "-200 rows")


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("three_d", [False, True])
def test_autograd(inplace, three_d):
    B, S, V = 3, 50, 157175
    x0, y = _inputs(B * S, V, BF16)
    if three_d:
        x0, y = x0.reshape(B, S, V), y.reshape(B, S)
    x = x0.clone().requires_grad_()
    g = torch.randn(y.shape, device="cuda")
    loss = CE.apply(x, y, inplace)
    _check_loss(loss, x0, y)
    (loss * g).sum().backward()
    _check_grad(x.grad, x0, y, g, f"autograd inplace={inplace}")
    if inplace:
        assert x.grad.data_ptr() == x.data_ptr(), "inplace gradient must live in the logits' storage"
    else:
        assert x.grad.data_ptr() != x.data_ptr()
        assert torch.equal(x.detach(), x0), "inplace=False must not modify the logits"


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("inplace", [False, True])
def test_expanded_grad_output(reduce, inplace):
    """loss.sum()/mean() hand the backward a stride-0 grad_output."""
    B, S, V = 2, 40, 30011
    x0, y = _inputs(B * S, V, BF16)
    x0, y = x0.reshape(B, S, V), y.reshape(B, S)
    x = x0.clone().requires_grad_()
    loss = CE.apply(x, y, inplace)
    getattr(loss, reduce)().backward()
    g = torch.full((B, S), 1.0 if reduce == "sum" else 1.0 / (B * S), device="cuda")
    _check_grad(x.grad, x0, y, g, f"expanded ({reduce})")


@pytest.mark.gpu
def test_grad_output_strides_and_dtypes():
    B, S, V = 4, 30, 3001
    x, y = _inputs(B * S, V, BF16)
    x3, y2 = x.reshape(B, S, V), y.reshape(B, S)
    loss, stats = ce_fwd(x3, y2)
    assert loss.shape == (B, S)
    cases = {
        "contiguous": torch.randn(B, S, device="cuda"),
        "transposed": torch.randn(S, B, device="cuda").t(),
        "every other": torch.randn(B, 2 * S, device="cuda")[:, ::2],
        "stride 0": torch.tensor(0.7, device="cuda").expand(B, S),
        "row broadcast": torch.randn(B, 1, device="cuda").expand(B, S),
        "bf16": torch.randn(B, S, device="cuda").to(BF16),
        "f16": torch.randn(B, S, device="cuda").to(F16),
        "f64": torch.randn(B, S, device="cuda", dtype=torch.float64),
        "flat [M]": torch.randn(2 * B * S, device="cuda")[::2],
    }
    for name, g in cases.items():
        _check_grad(ce_bwd(x3, y2, stats, g), x3, y2, g, name)


@pytest.mark.gpu
def test_labels_flat_with_3d_logits():
    B, S, V = 2, 20, 999
    x, y = _inputs(B * S, V, F32)
    loss = CE.apply(x.reshape(B, S, V).requires_grad_(), y)
    assert loss.shape == (B * S,)
    _check_loss(loss, x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("shift", [1, 3, 7])
def test_unaligned_storage(shift):
    """Logits whose storage does not start on a 16-byte boundary (a view at an odd offset)."""
    M, V = 40, 10007
    x0, y = _inputs(M, V, BF16)
    buf = torch.randn(M * V + shift, device="cuda").to(BF16)
    head = buf[:shift].clone()
    x = buf[shift:].view(M, V)
    x.copy_(x0)
    assert x.data_ptr() % 16
    loss, stats = ce_fwd(x, y)
    _check_loss(loss, x0, y)
    g = torch.randn(M, device="cuda")
    grad = ce_bwd(x, y, stats, g)
    _check_grad(grad, x0, y, g, "unaligned out-of-place")
    assert torch.equal(x, x0)
    assert ce_bwd(x, y, stats, g, True) is x
    _check_grad(x, x0, y, g, "unaligned inplace")
    assert torch.equal(buf[:shift], head), "elements before the view were written"


@pytest.mark.gpu
def test_non_contiguous_logits():
    M, V = 50, 4000
    big, y = _inputs(M, V + 96, BF16, special=False)
    y = y.clamp(max=V - 1)
    x = big[:, :V]
    assert not x.is_contiguous()
    x_before = x.clone()
    xs = x.detach().requires_grad_()
    loss = CE.apply(xs, y)
    _check_loss(loss, x, y)
    loss.sum().backward()
    _check_grad(xs.grad, x, y, torch.ones(M, device="cuda"), "non-contiguous")
    assert torch.equal(x, x_before), "inplace=False must not modify the logits"


@pytest.mark.gpu
def test_inplace_leaves_neighbours_alone():
    """Rows are written in place up to their exact ends: a slice of a bigger buffer keeps its neighbours."""
    M, V = 24, 1001
    full, y = _inputs(M + 2, V, BF16, special=False)
    before = full.clone()
    inner = full[1:M + 1]
    loss, stats = ce_fwd(inner, y[1:M + 1])
    ce_bwd(inner, y[1:M + 1], stats, torch.ones(M, device="cuda"), True)
    assert torch.equal(full[0], before[0]) and torch.equal(full[M + 1], before[M + 1])
    _check_grad(inner, before[1:M + 1], y[1:M + 1], torch.ones(M, device="cuda"), "slice inplace")


@pytest.mark.gpu
def test_deterministic():
    x, y = _inputs(128, 157175, BF16, seed=3)
    g = torch.randn(128, device="cuda")
    a_loss, a_stats = ce_fwd(x, y)
    b_loss, b_stats = ce_fwd(x, y)
    assert torch.equal(a_loss.nan_to_num(7.0), b_loss.nan_to_num(7.0)) and torch.equal(a_stats, b_stats)
    ga, gb = ce_bwd(x, y, a_stats, g), ce_bwd(x, y, b_stats, g)
    assert torch.equal(ga.view(torch.int16), gb.view(torch.int16))


@pytest.mark.gpu
def test_empty():
    x = torch.empty(0, 1000, dtype=BF16, device="cuda")
    y = torch.empty(0, dtype=torch.int64, device="cuda")
    loss, stats = ce_fwd(x, y)
    assert loss.shape == (0,) and stats.shape == (0, 2)
    assert ce_bwd(x, y, stats, torch.empty(0, device="cuda")).shape == (0, 1000)
    x3 = torch.empty(2, 0, 1000, dtype=BF16, device="cuda", requires_grad=True)
    loss = CE.apply(x3, torch.empty(2, 0, dtype=torch.int64, device="cuda"), True)
    assert loss.shape == (2, 0)
    loss.sum().backward()
    assert x3.grad.shape == x3.shape


@pytest.mark.gpu
def test_mixed_devices():
    x, y = _inputs(8, 100, BF16)
    with pytest.raises(ValueError, match="labels"):
        ce_fwd(x, y.cpu())
    loss, stats = ce_fwd(x, y)
    with pytest.raises(ValueError, match="grad_output"):
        ce_bwd(x, y, stats, torch.ones(8))
    with pytest.raises(ValueError, match="stats"):
        ce_bwd(x, y, stats.cpu(), torch.ones(8, device="cuda"))


@pytest.mark.gpu
def test_cuda_graph_capture():
    M, V = 64, 32003
    x, y = _inputs(M, V, BF16)
    g = torch.randn(M, device="cuda")
    loss, stats = ce_fwd(x, y)  # loads the kernels before capture
    grad = ce_bwd(x, y, stats, g)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_g, stats_g = ce_fwd(x, y)
        grad_g = ce_bwd(x, y, stats_g, g)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss_g.nan_to_num(7.0), loss.nan_to_num(7.0))
    assert torch.equal(grad_g.view(torch.int16), grad.view(torch.int16))


@pytest.mark.gpu
def test_inplace_saves_memory():
    M, V = 512, 157184
    x0, y = _inputs(M, V, BF16, special=False)
    peaks = {}
    for inplace in (False, True):
        x = x0.clone().requires_grad_()
        loss = CE.apply(x, y, inplace)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss.sum().backward()
        torch.cuda.synchronize()
        peaks[inplace] = torch.cuda.max_memory_allocated() - base
        del x, loss
    logits_bytes = M * V * 2
    assert peaks[False] >= logits_bytes
    assert peaks[True] < logits_bytes // 8, peaks
