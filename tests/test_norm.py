"""RMSNorm + FP8 block quantisation (SPEC.md §4.1): CPU checks and GPU correctness."""
import pytest
import torch

from helpers import assert_colwise, assert_rowwise, poison_
from linghe import presets
from linghe.cache import DiskCache
from linghe.kernel import prewarm_specs
from linghe.reference import quant_cols, quant_rows, ref_rms_norm_and_block_quant_forward
from linghe.utils.norm import NORM_ROWS, NORM_TILES, triton_rms_norm_and_block_quant_forward as rms_quant

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------- CPU -------
@pytest.mark.parametrize("preset", ["moe-2048", "moe-7168"])
def test_every_preset_specialisation_compiles(tmp_path, preset):
    specs = [(k, s) for k, s in prewarm_specs(presets.get(preset), "sm_90a") if k in (NORM_ROWS, NORM_TILES)]
    assert len(specs) >= 8 * len(presets.get(preset)["norm_hidden"])
    disk = DiskCache(tmp_path)
    for kernel, spec in specs:
        entry, compiled = kernel.build(spec, disk)
        assert compiled and entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("n", [128, 384, 1664, 5120, 16384, 17152, 65536])
def test_hidden_sizes_compile(tmp_path, n):
    disk = DiskCache(tmp_path)
    rows = NORM_ROWS.spec("sm_90a", N=n, DTYPE="bf16", WDTYPE="f32", ROUND_SCALE=True)
    assert NORM_ROWS.build(rows, disk)[0].cubin[:4] == b"\x7fELF"
    cols = NORM_TILES.spec("sm_90a", N=n, DTYPE="bf16", WDTYPE="f32", ROUND_SCALE=True, FUSED=False)
    assert NORM_TILES.build(cols, disk)[0].cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("n, fused", [(2048, True), (1536, True), (128, True), (4096, False), (7168, False)])
def test_fused_kernel_where_the_slab_fits(tmp_path, n, fused):
    from linghe.utils.norm import fused_fits

    assert fused_fits(n, "bf16") is fused
    if fused:
        spec = NORM_TILES.spec("sm_90a", N=n, DTYPE="bf16", WDTYPE="bf16", ROUND_SCALE=False, FUSED=True)
        assert ("__cluster_dims__" in NORM_TILES.render(spec)) is (n > 128)
        assert NORM_TILES.build(spec, DiskCache(tmp_path))[0].cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_other_dtypes_compile_for_sm89(tmp_path, dtype):
    # The unfused kernels need no cluster, so they also build for Ada (fp8 conversion needs sm_89).
    spec = NORM_TILES.spec("sm_89", N=1024, DTYPE=dtype, WDTYPE=dtype, ROUND_SCALE=False, FUSED=False)
    entry, _ = NORM_TILES.build(spec, DiskCache(tmp_path))
    assert entry.cubin[:4] == b"\x7fELF"


def _cpu(m=4, n=256):
    return torch.randn(m, n, dtype=torch.bfloat16), torch.randn(n, dtype=torch.bfloat16)


@pytest.mark.parametrize("mutate, exc, word", [
    (lambda x, w, kw: (x[0], w, kw), ValueError, "x"),
    (lambda x, w, kw: (x[None], w, kw), ValueError, "x"),
    (lambda x, w, kw: (x.int(), w, kw), TypeError, "x"),
    (lambda x, w, kw: (x[:, :200], w[:200], kw), ValueError, "N"),
    (lambda x, w, kw: (x, w[:128], kw), ValueError, "weight"),
    (lambda x, w, kw: (x, w.int(), kw), TypeError, "weight"),
    (lambda x, w, kw: (x, w, dict(output_mode=3)), ValueError, "output_mode"),
    (lambda x, w, kw: (x, w, dict(output_mode=1)), ValueError, "rms"),
    (lambda x, w, kw: (x, w, dict(out=torch.empty(4, 128, dtype=FP8))), ValueError, "out"),
    (lambda x, w, kw: (x, w, dict(out=torch.empty(4, 256))), TypeError, "out"),
    (lambda x, w, kw: (x, w, dict(scale=torch.empty(2, 4))), ValueError, "scale"),
    (lambda x, w, kw: (x, w, dict(rms=torch.empty(5))), ValueError, "rms"),
    (lambda x, w, kw: (x, w, kw), ValueError, "CUDA"),
])
def test_bad_input_is_named(mutate, exc, word):
    x, w, kw = mutate(*_cpu(), {})
    with pytest.raises(exc, match=word):
        rms_quant(x, w, **kw)


def test_reference_matches_independent_formulation():
    # y = x / rms(x) * w, quantised with an explicit per-block loop.
    torch.manual_seed(0)
    x, w = torch.randn(130, 256) * 3, torch.randn(256)
    q, s, r, qt, st = ref_rms_norm_and_block_quant_forward(x, w, eps=1e-6, round_scale=False)
    y = x / torch.sqrt((x * x).mean(1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(r, 1 / torch.sqrt((x * x).mean(1) + 1e-6))
    for m in (0, 77, 129):
        for j in range(2):
            block = y[m, 128 * j:128 * (j + 1)]
            scale = block.abs().max() / 448
            torch.testing.assert_close(s[j, m], scale, rtol=1e-5, atol=0)
            torch.testing.assert_close(q[m, 128 * j:128 * (j + 1)].float(), (block / scale).to(FP8).float(),
                                       rtol=0.07, atol=0)
    col = y[128:, 5]  # the partial last column block holds two rows
    torch.testing.assert_close(st[1, 5], col.abs().max() / 448, rtol=1e-5, atol=0)


def test_reference_round_scale_is_power_of_two_and_zero_blocks_clamp():
    y = torch.randn(3, 256)
    y[1] = 0
    _, s = quant_rows(y, True)
    m, _ = torch.frexp(s)
    assert (m == 0.5).all()
    assert s[0, 1] == 2.0 ** -99
    qt, st = quant_cols(y, False)
    assert qt.shape == (256, 3) and st.shape == (1, 256)


# ---------------------------------------------------------------- GPU -------
def _inputs(m, n, dtype=torch.bfloat16, wdtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(m, n, device="cuda", generator=g) ** 2 * torch.randn(m, n, device="cuda", generator=g).sign())
    w = torch.randn(n, device="cuda", generator=g)
    return x.to(dtype), w.to(wdtype)


def _check(x, w, outs, mode, round_scale, rms_in=None):
    q, s, r, qt, st = outs
    ref = ref_rms_norm_and_block_quant_forward(x, w, 1e-6, rms=rms_in, round_scale=round_scale, output_mode=mode)
    rinv = ref[2].double()
    y = (x.double() * rinv[:, None] * w.double()).float()
    if mode != 1:
        torch.testing.assert_close(r, ref[2], rtol=1e-5, atol=0)
        assert_rowwise(q, s, y, round_scale)
    if mode != 0:
        assert_colwise(qt, st, y, round_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 127, 128, 1000, 8192])
@pytest.mark.parametrize("n", [128, 2048, 5120, 7168, 16384])
def test_modes_against_reference(m, n):
    if m * n > 8192 * 7168:
        m = 1000  # keep the float64 reference affordable at the widest rows
    x, w = _inputs(m, n, seed=m + n)
    for round_scale in (True, False):
        out = poison_(torch.empty(m, n, dtype=FP8, device="cuda"))
        rms = poison_(torch.empty(m, device="cuda"))
        res2 = rms_quant(x, w, out=out, rms=rms, round_scale=round_scale, output_mode=2)
        assert res2[0] is out and res2[2] is rms
        _check(x, w, res2, 2, round_scale)
        res0 = rms_quant(x, w, round_scale=round_scale, output_mode=0)
        _check(x, w, res0, 0, round_scale)
        res1 = rms_quant(x, w, rms=res2[2], round_scale=round_scale, output_mode=1)
        assert res1[0] is None and res1[1] is None
        _check(x, w, res1, 1, round_scale, rms_in=res2[2])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, wdtype", [(torch.float16, torch.float32), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n", [1536, 4096])
def test_other_dtypes(dtype, wdtype, n):
    x, w = _inputs(300, n, dtype, wdtype, seed=3)
    for mode in (0, 2):
        _check(x, w, rms_quant(x, w, round_scale=True, output_mode=mode), mode, True)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [384, 1664, 17152])  # odd block counts: one-row-per-CTA and looping row kernels
def test_unusual_hidden_sizes(n):
    x, w = _inputs(257, n, seed=n)
    for mode in (0, 2):
        _check(x, w, rms_quant(x, w, round_scale=False, output_mode=mode), mode, False)


@pytest.mark.gpu
def test_return_layouts_and_scale_quirk():
    m, n = 200, 512
    x, w = _inputs(m, n, seed=5)
    scale = poison_(torch.empty(m, n // 128, device="cuda"))
    q, s, r, qt, st = rms_quant(x, w, scale=scale, round_scale=True, output_mode=0)
    assert q.shape == (m, n) and q.dtype == FP8
    assert s.shape == (n // 128, m) and s.dtype == torch.float32
    assert r.shape == (m,) and qt.shape == (n, m) and st.shape == (2, n)
    torch.testing.assert_close(scale, s.t())  # the caller's buffer gets [M, N/128]
    assert s.data_ptr() != scale.data_ptr()


@pytest.mark.gpu
def test_empty_m():
    x, w = _inputs(1, 256)
    q, s, r, qt, st = rms_quant(x[:0], w, output_mode=2)
    assert q.shape == (0, 256) and s.shape == (2, 0) and r.shape == (0,) and qt.shape == (256, 0) and st.shape == (0, 256)


@pytest.mark.gpu
def test_inputs_untouched_and_strided_input():
    x, w = _inputs(256, 1024, seed=9)
    wide = torch.cat([x, x], 1)[:, 1024:]  # a non-contiguous view
    before = wide.clone()
    q, s, *_ = rms_quant(wide, w, round_scale=True, output_mode=0)
    assert torch.equal(wide, before)
    q2, s2, *_ = rms_quant(x, w, round_scale=True, output_mode=0)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.gpu
def test_ten_m_compile_once():
    n = 640
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    before = NORM_TILES.loaded()
    for m in (1, 3, 17, 128, 129, 255, 256, 1000, 1024, 4097):
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        rms_quant(x, w, eps=1e-5 * (1 + m % 3), round_scale=True, output_mode=2)
    assert NORM_TILES.loaded() - before == 1


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    m, n = 1000, 2048
    x, w = _inputs(m, n, seed=11)
    rms_quant(x, w, round_scale=True, output_mode=2)  # compile + load outside capture
    graph = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(graph):
        outs = rms_quant(static_x, w, round_scale=True, output_mode=2)
    x2, _ = _inputs(m, n, seed=12)
    static_x.copy_(x2)
    for t in outs:
        poison_(t)
    graph.replay()
    torch.cuda.synchronize()
    _check(x2, w, outs, 2, True)


@pytest.mark.gpu
def test_compile_during_capture_is_a_clear_error():
    from linghe.kernel import CaptureError

    x, w = _inputs(64, 384, seed=13)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(CaptureError, match="prewarm"):
        with torch.cuda.graph(graph):
            rms_quant(x, w, round_scale=False, output_mode=1, rms=torch.ones(64, device="cuda"))
