"""MoE permute / unpermute (SPEC.md §4.4, §4.5): CPU checks and GPU correctness."""
import pytest
import torch

from linghe import presets
from linghe.cache import DiskCache
from linghe.kernel import prewarm_specs
from linghe.reference.permute import make_row_id_map, ref_permute, ref_unpermute
from linghe.utils.gather import (PERMUTE, PERMUTE_PAD, check_row_id_map_errors, row_tiling,
                                 triton_permute_with_mask_map as permute, validate_row_id_map)
from linghe.utils.scatter import UNPERMUTE, triton_unpermute_with_mask_map as unpermute

FP8 = torch.float8_e4m3fn
OURS = (PERMUTE, PERMUTE_PAD, UNPERMUTE)


# ---------------------------------------------------------------- CPU -------
@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_preset_specialisations_compile(tmp_path, preset):
    specs = [(k, s) for k, s in prewarm_specs(presets.get(preset), "sm_90a") if k in OURS]
    assert len(specs) == 20  # 12 permutes, 6 padding fills, 2 unpermutes
    if preset != presets.DEFAULT_PRESET:
        specs = specs[::4]  # the default preset compiles all; others a sample (CI time)
    disk = DiskCache(tmp_path)
    for kernel, spec in specs:
        entry, compiled = kernel.build(spec, disk)
        assert compiled and entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize("kernel, constants", [
    # odd row lengths (narrow vectors, partial chunks), odd expert counts, odd scale/prob widths
    (PERMUTE, dict(ROW_BYTES=2002, E=7, SCALE_BYTES=6, PROB_BYTES=2, PADDED=True)),
    (PERMUTE, dict(ROW_BYTES=1001, E=1, SCALE_BYTES=0, PROB_BYTES=8, PADDED=False)),
    (PERMUTE, dict(ROW_BYTES=32768, E=1000, SCALE_BYTES=512, PROB_BYTES=4, PADDED=True)),
    (PERMUTE, dict(ROW_BYTES=128, E=512, SCALE_BYTES=4, PROB_BYTES=0, PADDED=False)),
    (PERMUTE_PAD, dict(ROW_BYTES=2002, SCALE_ELEMS=3, SCALE_ELEM_BYTES=2, PROB_BYTES=8)),
    (PERMUTE_PAD, dict(ROW_BYTES=1001, SCALE_ELEMS=1, SCALE_ELEM_BYTES=8, PROB_BYTES=1)),
    (UNPERMUTE, dict(ROW_BYTES=2002, DTYPE="bf16", E=7, PROB_BYTES=2)),
    (UNPERMUTE, dict(ROW_BYTES=4 * 16384, DTYPE="f32", E=1000, PROB_BYTES=8)),
    (UNPERMUTE, dict(ROW_BYTES=2 * 5120, DTYPE="f16", E=512, PROB_BYTES=0)),
])
def test_odd_shapes_compile(tmp_path, arch, kernel, constants):
    entry, _ = kernel.build(kernel.spec(arch, **constants), DiskCache(tmp_path))
    assert entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("row_bytes", [1, 2, 6, 128, 2002, 4096, 4097, 14336, 65536])
def test_row_tiling_covers_every_byte(row_bytes):
    t = row_tiling(row_bytes)
    assert t["VB"] in (1, 2, 4, 8, 16) and row_bytes % t["VB"] == 0 and t["NV"] * t["VB"] == row_bytes
    assert (t["NCH"] - 1) * 32 * t["U"] < t["NV"] <= t["NCH"] * 32 * t["U"]


def _args(T=6, H=256, E=8):
    inp = torch.randn(T, H).to(torch.bfloat16)
    rid, n = make_row_id_map(torch.rand(T, E) < 0.5)
    return dict(inp=inp, scale=torch.rand(T), probs=torch.rand(T, E), row_id_map=rid, num_out_tokens=n,
                contiguous=True, tokens_per_expert=None)


@pytest.mark.parametrize("change, exc, word", [
    (dict(inp=[[1.0]]), TypeError, "inp"),
    (dict(inp=torch.randn(6)), ValueError, "inp"),
    (dict(inp=torch.randn(6, 0)), ValueError, "inp"),
    (dict(row_id_map=torch.zeros(6, 8, dtype=torch.int64)), TypeError, "row_id_map"),
    (dict(row_id_map=torch.zeros(5, 8, dtype=torch.int32)), ValueError, "row_id_map"),
    (dict(row_id_map=torch.zeros(8, 6, dtype=torch.int32)), ValueError, "row_id_map"),
    (dict(row_id_map=torch.zeros(48, dtype=torch.int32)), ValueError, "row_id_map"),
    (dict(scale=torch.rand(5)), ValueError, "scale"),
    (dict(scale=torch.rand(6, 2, 2)), ValueError, "scale"),
    (dict(probs=torch.rand(6, 7)), ValueError, "probs"),
    (dict(probs=torch.rand(6)), ValueError, "probs"),
    (dict(probs=torch.ones(6, 8, dtype=torch.int32)), TypeError, "probs"),
    (dict(num_out_tokens=-1), ValueError, "num_out_tokens"),
    (dict(num_out_tokens=3.5), TypeError, "num_out_tokens"),
    (dict(num_out_tokens=True), TypeError, "num_out_tokens"),
    (dict(tokens_per_expert=torch.ones(7, dtype=torch.int32), contiguous=False), ValueError, "tokens_per_expert"),
    (dict(tokens_per_expert=torch.ones(8), contiguous=False), TypeError, "tokens_per_expert"),
    ({}, ValueError, "CUDA"),
])
def test_permute_bad_input_is_named(change, exc, word):
    kw = {**_args(), **change}
    with pytest.raises(exc, match=word):
        permute(**kw)


@pytest.mark.parametrize("change, exc, word", [
    (dict(grad=torch.ones(10, 64, dtype=torch.int32)), TypeError, "grad"),
    (dict(grad=torch.randn(10)), ValueError, "grad"),
    (dict(grad=torch.randn(10, 0)), ValueError, "grad"),
    (dict(row_id_map=torch.zeros(6, 8)), TypeError, "row_id_map"),
    (dict(row_id_map=torch.zeros(6, 8, 1, dtype=torch.int32)), ValueError, "row_id_map"),
    (dict(probs=torch.rand(11)), ValueError, "probs"),
    (dict(probs=torch.rand(10, 1)), ValueError, "probs"),
    ({}, ValueError, "CUDA"),
])
def test_unpermute_bad_input_is_named(change, exc, word):
    kw = {**dict(grad=torch.randn(10, 64), row_id_map=torch.full((6, 8), -1, dtype=torch.int32),
                 probs=torch.rand(10)), **change}
    with pytest.raises(exc, match=word):
        unpermute(kw["grad"], kw["row_id_map"], kw["probs"])


def test_aliases_are_the_same_objects():
    import linghe.util.gather as g
    import linghe.util.scatter as s
    assert g.triton_permute_with_mask_map is permute
    assert s.triton_unpermute_with_mask_map is unpermute


def test_make_row_id_map_layout():
    torch.manual_seed(0)
    routing = torch.rand(37, 9) < 0.3
    routing[3] = False  # a token with no expert
    for p in (1, 16):
        rid, n = make_row_id_map(routing, p)
        counts = routing.sum(0)
        assert n == int(((counts + p - 1) // p * p).sum())
        start = 0
        for e in range(9):
            rows = rid[:, e][routing[:, e]]
            assert rows.tolist() == list(range(start, start + int(counts[e])))  # tokens in order
            assert (rid[:, e][~routing[:, e]] == -1).all()
            start += -(-int(counts[e]) // p) * p
        validate_row_id_map(rid, n)
        with pytest.raises(ValueError, match="num_out_tokens"):
            validate_row_id_map(rid, int(rid.max()))


def test_references_match_loops():
    torch.manual_seed(1)
    T, H, E = 11, 16, 5
    rid, n = make_row_id_map(torch.rand(T, E) < 0.5, 4)
    inp, scale, probs = torch.randn(T, H), torch.randn(T, 3), torch.rand(T, E)
    out, ps, pp, dst = ref_permute(inp, scale, probs, rid, n)
    grad, gp = torch.randn(n, H), torch.rand(n)
    uo, rp = ref_unpermute(grad, rid, gp)
    seen = set()
    for t in range(T):
        acc = torch.zeros(H, dtype=torch.float64)
        for e in range(E):
            r = int(rid[t, e])
            if r < 0:
                assert rp[t, e] == 0
                continue
            seen.add(r)
            assert torch.equal(out[r], inp[t]) and torch.equal(ps[r], scale[t]) and pp[r] == probs[t, e]
            acc += grad[r].double()
            assert rp[t, e] == gp[r]
        torch.testing.assert_close(uo[t], acc)
    assert sorted(seen) == sorted(dst.tolist())
    for r in set(range(n)) - seen:
        assert (out[r] == 0).all() and (ps[r] == 0).all() and pp[r] == 0


def test_fp8_reference_is_bit_copy():
    x = torch.randn(4, 128).to(FP8)
    rid, n = make_row_id_map(torch.ones(4, 2, dtype=torch.bool))
    out, _, _, dst = ref_permute(x, None, None, rid, n)
    assert out.dtype == FP8 and torch.equal(out.view(torch.uint8)[rid[:, 1].long()], x.view(torch.uint8))


# ---------------------------------------------------------------- GPU -------
def _routing(T, E, topk, g, margin=None, empty_every=0):
    """Top-k of random logits (plus any expert within `margin` of the k-th, as the Triton tests do)."""
    logits = torch.randn(T, E, device="cuda", generator=g)
    k = min(topk, E)
    kth = logits.topk(k, dim=1).values[:, -1:]
    routing = logits >= (kth if margin is None else kth - margin)
    if empty_every:
        routing[1::empty_every] = False  # token 0 keeps its experts (T = 1 must route something)
    return routing, torch.softmax(logits, -1)


def _bits(x):
    return None if x is None else x.contiguous().view(torch.uint8)


def _assert_bits(actual, expected, what):
    assert (actual is None) == (expected is None), what
    if actual is None:
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    a, b = _bits(actual), _bits(expected)
    bad = (a != b)
    assert not bad.any(), f"{what}: {int(bad.sum())} bytes differ"


def _check_permute(inp, scale, probs, rid, n, contiguous, tpe):
    outs = permute(inp, scale, probs, rid, n, contiguous, tpe)
    out, ps, pp, dst = ref_permute(inp, scale, probs, rid, n)
    if ps is not None and not contiguous and tpe is not None:
        untargeted = torch.ones(n, dtype=torch.bool, device=inp.device)
        untargeted[dst] = False
        ps[untargeted] = 1e-30  # SPEC §4.4: padding scale 1e-30 when tokens_per_expert is given
    _assert_bits(outs[0], out, "output")
    _assert_bits(outs[1], ps, "permuted_scale")
    _assert_bits(outs[2], pp, "permuted_probs")
    return outs


PERMUTE_CASES = [  # (T, hidden, E, topk)
    (1, 2048, 256, 8),
    (5, 2048, 256, 8),        # tokens < expert padding
    (3, 128, 1, 1),
    (200, 7168, 512, 16),
    (1000, 2048, 32, 2),
    (333, 1000, 64, 6),       # 2000-byte bf16 rows: a partial chunk
    (257, 1001, 7, 3),        # odd row bytes: narrow vectors
    (16, 16384, 8, 4),
    (4096, 2048, 256, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T, hidden, E, topk", PERMUTE_CASES)
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("mode", ["contiguous", "padded", "padded_tpe"])
def test_permute_against_reference(T, hidden, E, topk, dtype, mode):
    g = torch.Generator(device="cuda").manual_seed(T * 131 + hidden + E)
    routing, probs = _routing(T, E, topk, g, margin=0.01 if T % 2 else None, empty_every=7)
    contiguous = mode == "contiguous"
    rid, n = make_row_id_map(routing, 1 if contiguous else 16)
    x = torch.randn(T, hidden, device="cuda", generator=g) ** 3
    if dtype == "fp8":
        inp = x.to(FP8)
        hs = hidden // 128 if hidden % 128 == 0 else 0
        scale = torch.rand((T, hs) if hs else (T,), device="cuda", generator=g) + 0.01
    else:
        inp = x.to(torch.bfloat16)
        scale = None if E % 2 else torch.rand(T, device="cuda", generator=g)
    probs = probs if (T + E) % 3 else None
    tpe = routing.sum(0).int() if mode == "padded_tpe" else None
    _check_permute(inp, scale, probs, rid, n, contiguous, tpe)


@pytest.mark.gpu
@pytest.mark.parametrize("contiguous", [True, False])
def test_permute_any_unique_map(contiguous):
    # Destinations in random order with gaps anywhere (not the 16-after-each-expert layout).
    g = torch.Generator(device="cuda").manual_seed(5)
    T, E, H = 300, 24, 512
    routing, probs = _routing(T, E, 3, g)
    routed = int(routing.sum())
    n = routed if contiguous else routed + 77
    dest = torch.randperm(n, device="cuda", generator=g)[:routed].int()
    rid = torch.full((T, E), -1, dtype=torch.int32, device="cuda")
    rid[routing] = dest
    inp = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    scale = torch.rand(T, 4, device="cuda", generator=g).half()
    _check_permute(inp, scale, probs.double(), rid, n, contiguous, None)
    _check_permute(inp, scale, probs, rid, n, contiguous, routing.sum(0))


@pytest.mark.gpu
def test_permute_strided_inputs_and_num_out_none():
    g = torch.Generator(device="cuda").manual_seed(6)
    T, E, H = 64, 16, 256
    routing, probs = _routing(T, E, 4, g)
    rid, n = make_row_id_map(routing)
    big = torch.randn(T, 2 * H, device="cuda", generator=g).to(torch.bfloat16)
    inp = big[:, H:]  # not contiguous
    probs_t = probs.t().contiguous().t()  # column-major
    before = big.clone()
    outs = _check_permute(inp, None, probs_t, rid, n, True, None)
    assert torch.equal(big, before)
    again = permute(inp, None, probs_t, rid, None)  # num_out_tokens computed (a documented sync)
    for a, b in zip(outs, again):
        _assert_bits(a, b, "num_out_tokens=None")


@pytest.mark.gpu
def test_permute_empty_and_all_padding():
    rid = torch.empty(0, 8, dtype=torch.int32, device="cuda")
    inp = torch.empty(0, 256, dtype=torch.bfloat16, device="cuda")
    out, ps, pp = permute(inp, torch.empty(0, device="cuda"), torch.empty(0, 8, device="cuda"), rid, 0)
    assert out.shape == (0, 256) and ps.shape == (0,) and pp.shape == (0,)
    out, ps, pp = permute(inp, torch.empty(0, device="cuda"), torch.empty(0, 8, device="cuda"), rid, 32,
                          False, torch.zeros(8, dtype=torch.int32, device="cuda"))
    assert (out == 0).all() and (ps == 1e-30).all() and (pp == 0).all()


@pytest.mark.gpu
def test_out_of_range_rows_are_skipped_and_flagged():
    try:
        check_row_id_map_errors()  # start clean
    except ValueError:
        pass
    g = torch.Generator(device="cuda").manual_seed(7)
    T, E, H = 40, 8, 256
    routing, probs = _routing(T, E, 2, g)
    rid, n = make_row_id_map(routing)
    inp = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    out, _, pp = permute(inp, None, probs, rid, n - 3)  # the last 3 rows have no room
    torch.cuda.synchronize()
    keep = (rid >= 0) & (rid < n - 3)
    t, e = torch.nonzero(keep, as_tuple=True)
    assert torch.equal(out[rid[t, e].long()], inp[t]) and torch.equal(pp[rid[t, e].long()], probs[t, e])
    with pytest.raises(ValueError, match="num_out_tokens"):
        check_row_id_map_errors(inp.device)
    check_row_id_map_errors(inp.device)  # cleared
    grad = torch.randn(n - 2, H, device="cuda", generator=g).to(torch.bfloat16)
    uo, _ = unpermute(grad, rid, None)
    with pytest.raises(ValueError, match="grad"):
        check_row_id_map_errors(inp.device)
    kept = torch.where(rid < n - 2, rid, -1)
    _assert_sum_close(uo, ref_unpermute(grad, kept, None)[0], ref_unpermute(grad.abs(), kept, None)[0])


@pytest.mark.gpu
def test_mismatched_devices_are_named():
    inp = torch.randn(4, 128, device="cuda").to(torch.bfloat16)
    rid = torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_id_map"):
        permute(inp, None, None, rid, 4)
    with pytest.raises(ValueError, match="probs"):
        unpermute(inp, rid.cuda(), torch.rand(4))


UNPERMUTE_CASES = [  # (T, hidden, E, topk)
    (1, 2048, 256, 8),
    (5, 2048, 256, 8),
    (3, 128, 1, 1),
    (200, 7168, 512, 16),
    (1000, 2048, 32, 2),
    (257, 1001, 7, 3),
    (16, 16384, 8, 4),
    (4096, 2048, 256, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("T, hidden, E, topk", UNPERMUTE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("padded", [False, True])
def test_unpermute_against_reference(T, hidden, E, topk, dtype, padded):
    g = torch.Generator(device="cuda").manual_seed(T * 7 + hidden + E)
    routing, _ = _routing(T, E, topk, g, margin=0.1 if T % 2 else None, empty_every=5)
    rid, n = make_row_id_map(routing, 16 if padded else 1)
    grad = (torch.randn(n, hidden, device="cuda", generator=g) * 4).to(dtype)
    probs = torch.rand(n, device="cuda", generator=g) if (T + E) % 3 else None
    if padded:  # padding rows must never be read
        untargeted = torch.ones(n, dtype=torch.bool, device="cuda")
        untargeted[rid[rid >= 0].long()] = False
        grad[untargeted] = float("nan")
        if probs is not None:
            probs[untargeted] = float("nan")
    out, rp = unpermute(grad, rid, probs)
    ref, rp_ref = ref_unpermute(grad, rid, probs)
    assert out.shape == (T, hidden) and out.dtype == dtype
    _assert_sum_close(out, ref, ref_unpermute(grad.abs(), rid, None)[0])
    _assert_bits(rp, rp_ref, "restore_probs")


def _assert_sum_close(out, ref, ref_abs):
    """SPEC §4.5: within one ulp of the float64 sum rounded to out.dtype (rtol 2^-7, atol 1e-6). Where a
    sum of many terms cancels, the fp32 accumulation's own rounding (<= k * 2^-24 * sum|x|, k <= 32 terms
    here) can exceed atol; that slack is allowed too."""
    want = ref.to(out.dtype).double()
    err = (out.double() - want).abs()
    bad = err > 2 ** -7 * want.abs() + 1e-6 + 2 ** -19 * ref_abs
    assert not bad.any(), (f"{int(bad.sum())} sums off, e.g. got {out.double()[bad][:4].tolist()} "
                           f"want {want[bad][:4].tolist()}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unpermute_is_ordered_fp32_sum_and_deterministic(dtype):
    # Bitwise equal to an fp32 running sum in increasing expert order, rounded once.
    g = torch.Generator(device="cuda").manual_seed(11)
    T, E, H = 512, 64, 2048
    routing, _ = _routing(T, E, 16, g, margin=0.3)
    rid, n = make_row_id_map(routing, 16)
    # wide dynamic range so any other order or an extra rounding shows
    spread = 4.0 if dtype == torch.bfloat16 else 1.5  # fp16 must not overflow
    grad = torch.randn(n, H, device="cuda", generator=g) * torch.exp(spread * torch.randn(n, 1, device="cuda",
                                                                                          generator=g))
    grad = grad.to(dtype)
    acc = torch.zeros(T, H, dtype=torch.float32, device="cuda")
    for e in range(E):
        col = rid[:, e]
        acc += torch.where((col >= 0)[:, None], grad[col.clamp_min(0).long()].float(), 0.0)
    first, _ = unpermute(grad, rid, None)
    second, _ = unpermute(grad, rid, None)
    _assert_bits(first, second, "second run")
    _assert_bits(first, acc.to(dtype), "ordered fp32 sum")


@pytest.mark.gpu
def test_unpermute_is_adjoint_of_permute():
    g = torch.Generator(device="cuda").manual_seed(12)
    T, E, H = 128, 32, 1024
    routing, probs = _routing(T, E, 4, g)
    rid, n = make_row_id_map(routing, 16)
    inp = torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16)
    out, _, pp = permute(inp, None, probs, rid, n, False, routing.sum(0))
    back, rp = unpermute(out, rid, pp)
    k = routing.sum(1, keepdim=True).to(torch.float32)
    torch.testing.assert_close(back.float(), (inp.float() * k).to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)
    _assert_bits(rp, torch.where(routing, probs, 0.0), "restore_probs")
