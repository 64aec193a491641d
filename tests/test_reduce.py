"""Batched reductions (SPEC.md §4.11, §4.12): CPU checks (compile, table, indexing model,
validation, references) and GPU correctness, determinism and graph capture."""
import ctypes
import math
import random

import pytest
import torch

from linghe import presets
from linghe.cache import DiskCache
from linghe.reference.reduce import ref_batch_count_zero, ref_batch_sum_with_ord
from linghe.utils import reduce as R
from linghe.utils.reduce import triton_batch_count_zero as count_zero, triton_batch_sum_with_ord as sum_ord

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------- CPU -------
def _preset_specs(name):
    return [(k, k.spec("sm_90a", **c)) for k, c in R._prewarm(presets.get(name))]


def test_every_preset_specialisation_compiles(tmp_path):
    specs = _preset_specs("moe-2048")
    for name in presets.PRESETS:  # the lists do not depend on model widths
        assert {s for _, s in _preset_specs(name)} == {s for _, s in specs}
    assert len(specs) == len(R.CAPS) * 6 + 2
    disk = DiskCache(tmp_path)
    for kernel, spec in specs:
        entry, compiled = kernel.build(spec, disk)
        assert compiled and entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_every_kind_compiles(tmp_path, arch):
    disk = DiskCache(tmp_path)
    for c in (dict(OP="zero", CAP=16, KINDS="z1_z1s_z2_z2s_z4_z4s_z8_z8s"),
              dict(OP="l1", CAP=1024, KINDS="bf16_f16_f32"), dict(OP="l2", CAP=64, KINDS="f16")):
        entry, _ = R.BATCH_REDUCE.build(R.BATCH_REDUCE.spec(arch, **c), disk)
        assert entry.cubin[:4] == b"\x7fELF"
    for acc in ("f64", "i64"):
        entry, _ = R.BATCH_COMBINE.build(R.BATCH_COMBINE.spec(arch, ACC=acc), disk)
        assert entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("constants, word", [
    (dict(OP="l3", CAP=16, KINDS="f32"), "OP"),
    (dict(OP="l2", CAP=17, KINDS="f32"), "CAP"),
    (dict(OP="l2", CAP=16, KINDS="f32_bf16"), "KINDS"),
    (dict(OP="l2", CAP=16, KINDS="z4s"), "KINDS"),
    (dict(OP="zero", CAP=16, KINDS="f32"), "KINDS"),
])
def test_bad_constants_are_rejected(constants, word):
    with pytest.raises(ValueError, match=word):
        R.BATCH_REDUCE.render(R.BATCH_REDUCE.spec("sm_90a", **constants))


def test_template_table_size_matches_host():
    # The kernel's by-value parameter, as NVRTC lays it out, has exactly the ctypes table's size.
    from cuda.bindings import nvrtc

    from linghe import compiler

    for cap in R.CAPS:
        source = R.BATCH_REDUCE.render(R.BATCH_REDUCE.spec("sm_90a", OP="l2", CAP=cap, KINDS="bf16_f32"))
        headers = compiler.headers_for(source)
        err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"reduce.cu", len(headers),
                                             [h.encode() for h in headers.values()], [n.encode() for n in headers])
        options = [b"--gpu-architecture=compute_90a", b"-std=c++17", b"--device-as-default-execution-space"]
        try:
            (status,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
            assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS
            err, size = nvrtc.nvrtcGetPTXSize(prog)
            ptx = bytearray(size)  # writable: never let NVRTC write into an immutable bytes object
            nvrtc.nvrtcGetPTX(prog, ptx)
        finally:
            nvrtc.nvrtcDestroyProgram(prog)
        ptx = bytes(ptx).decode(errors="replace")
        assert f".param .align 8 .b8 linghe_batch_reduce_param_0[{ctypes.sizeof(R.TABLES[cap])}]" in ptx
        assert ".local" not in ptx  # the table is read in place (constant bank), never copied per thread


@pytest.mark.parametrize("cap", R.CAPS)
def test_table_layout_matches_template(cap):
    table = R.TABLES[cap]
    assert ctypes.sizeof(table) == 24 * cap + 8  # Entry{u64,i64,u32,u32}[cap], u32 count, u32 total
    assert table.count.offset == 24 * cap and table.total.offset == 24 * cap + 4
    assert ctypes.sizeof(table) + 8 <= 32764  # with the partials pointer: within the kernel-parameter limit
    assert isinstance(table(), ctypes.Structure)  # cuda.bindings passes a Structure's address (type None)


def test_plan_chunks_tags_and_groups():
    c = R.CHUNK
    entries = [(4096, 1, "f32", 4), (8192 + 4, c // 4 + 3, "f32", 4), (16384, c + 1, "z1", 1), (20000, 8, "bf16", 2)]
    (cap, kinds, words, total), = R.plan(entries)
    assert cap == 16 and kinds == "bf16_f32_z1"
    # head 3 then c/4 elements = one full chunk; 1-byte: c+1 bytes = 2 chunks; 8 bf16 at 16B = 1 chunk
    assert [w & 0xffffffff for w in words[2::3]] == [0, 1, 2, 4] and total == 5
    assert [w >> 32 for w in words[2::3]] == [1, 1, 2, 0]
    many = [(4096 * i, 5, "f32", 4) for i in range(1, 2500)]
    launches = R.plan(many)
    assert [(cap, len(w) // 3, t) for cap, _, w, t in launches] == [(1024, 1024, 1024), (1024, 1024, 1024),
                                                                      (1024, 451, 451)]
    assert [R.plan(many[:n])[0][0] for n in (1, 16, 17, 64, 65, 256, 257, 1024)] == [16, 16, 64, 64, 256, 256,
                                                                                     1024, 1024]


ELEMENT_SIZE = {"f32": 4, "bf16": 2, "f16": 2, "z1": 1, "z2": 2, "z4": 4, "z8": 8,
                "z1s": 1, "z2s": 2, "z4s": 4, "z8s": 8}


def _model_reads(words, count, total, kinds, grid):
    """The template's stage-1 index arithmetic, in Python, for one launch.

    Yields (cta, entry, first element, element count) for every load the kernel issues.
    """
    chunk0 = [words[3 * i + 2] & 0xffffffff for i in range(count)]
    for b in range(grid):
        c_begin, c_end = b * total // grid, (b + 1) * total // grid
        lo, hi = 0, count - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if chunk0[mid] <= c_begin:
                lo = mid
            else:
                hi = mid - 1
        e = lo
        e_end = chunk0[e + 1] if e + 1 < count else total
        for c in range(c_begin, c_end):
            while c >= e_end:
                e += 1
                e_end = chunk0[e + 1] if e + 1 < count else total
            ptr, n, tag = words[3 * e], words[3 * e + 1], words[3 * e + 2] >> 32
            es = ELEMENT_SIZE[kinds[tag]]
            k = c - chunk0[e]
            head = min(n, ((16 - (ptr & 15)) & 15) // es)
            body = ptr + head * es
            body_bytes = (n - head) * es
            off = k * R.CHUNK
            if off + R.CHUNK <= body_bytes:
                for u in range(R.UNROLL):
                    for t in range(R.THREADS):
                        byte = off + (u * R.THREADS + t) * 16
                        assert (body + byte) % 16 == 0
                        yield b, e, head + byte // es, 16 // es
            else:
                nvec = body_bytes >> 4
                for u in range(R.UNROLL):
                    for t in range(R.THREADS):
                        idx = (off >> 4) + t + u * R.THREADS
                        if idx < nvec:
                            assert (body + idx * 16) % 16 == 0
                            yield b, e, head + idx * 16 // es, 16 // es
                for t in range(min(R.THREADS, (body_bytes & 15) // es)):
                    yield b, e, head + nvec * 16 // es + t, 1
            if k == 0:
                for t in range(min(R.THREADS, head)):
                    yield b, e, t, 1


def _covered_by_model(entries, grid):
    """Intervals of elements the kernel reads, per entry of ``entries`` (through R.plan)."""
    covered, first_entry = {}, 0
    for cap, kinds, words, total in R.plan(entries):
        count = len(words) // 3
        for _, e, start, length in _model_reads(words, count, total, kinds.split("_"), min(grid, total)):
            covered.setdefault(first_entry + e, []).append((start, length))
        first_entry += count
    return covered


@pytest.mark.parametrize("grid", [1, 3, 7, 1000])
def test_kernel_index_model_reads_every_element_once(grid):
    rng = random.Random(grid)
    c = R.CHUNK
    entries, address = [], 1 << 20
    for kind, es in (("f32", 4), ("bf16", 2), ("z1", 1), ("z8", 8), ("f16", 2), ("f32", 4)):
        for n in (1, 2, 3, 15, 17, c // es - 1, c // es, c // es + 1, 2 * c // es + 5, rng.randint(1, 3 * c // es)):
            misalign = es * rng.randint(0, 16 // es - 1)
            entries.append((address + misalign, n, kind, es))
            address = (address + n * es + 4096 + 15) // 16 * 16  # allocations are 16-byte aligned
    covered = _covered_by_model(entries, grid)
    for i, (_, n, _, _) in enumerate(entries):
        spans = sorted(covered[i])
        position = 0
        for start, length in spans:
            assert start == position, f"entry {i} (n={n}): gap or overlap at element {position}"
            position += length
        assert position == n, f"entry {i}: read {position} of {n} elements"


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SUM_DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _read(ptr, n, es, dtype):
    return torch.frombuffer(bytearray(ctypes.string_at(ptr, n * es)), dtype=dtype)


def _emulated_launchers(monkeypatch):
    """Replace both kernels by Python emulations that read the real (host) memory the table names,
    through the template's index arithmetic, and write partials and result where the kernels would."""
    launched = []

    def stage1(device, op, cap, kinds_key):
        def run(grid, block, args):
            table, base = args
            assert isinstance(table, R.TABLES[cap]) and block == (R.THREADS, 1, 1)
            count, total, kinds = table.count, table.total, kinds_key.split("_")
            words = list(table.words[:3 * count])
            assert count <= cap and grid[0] <= total
            launched.append((op, cap, kinds_key, count, grid[0]))
            partial = [0.0 if op != "zero" else 0] * grid[0]
            for b, e, start, length in _model_reads(words, count, total, kinds, grid[0]):
                ptr, kind = words[3 * e], kinds[words[3 * e + 2] >> 32]
                es = ELEMENT_SIZE[kind]
                if op == "zero":
                    bits = _read(ptr + start * es, length, es, _BITS[es]).long()
                    if kind.endswith("s"):
                        bits &= (1 << (8 * es - 1)) - 1  # all bits but the sign
                    partial[b] += int((bits == 0).sum())
                else:
                    x = _read(ptr + start * es, length, es, _SUM_DTYPE[kind]).double()
                    partial[b] += float((x.abs() if op == "l1" else x * x).sum())
            slot = (ctypes.c_int64 if op == "zero" else ctypes.c_double) * grid[0]
            slot.from_address(base)[:] = partial
        return run

    def combine(device, acc):
        def run(grid, block, args):
            ptr, count, out = args
            values = (ctypes.c_double if acc == "f64" else ctypes.c_int64) * count
            total = sum(values.from_address(ptr)[:]) if count else 0
            if acc == "f64":
                ctypes.c_float.from_address(out).value = total
            else:
                ctypes.c_int64.from_address(out).value = total
        return run

    monkeypatch.setattr(R.BATCH_REDUCE, "launcher", stage1)
    monkeypatch.setattr(R.BATCH_COMBINE, "launcher", combine)
    monkeypatch.setitem(R._sm_counts, None, 1)  # the CPU "device": grids of up to 4 CTAs
    return launched


def test_wrapper_end_to_end_through_the_index_model(monkeypatch):
    """Wrapper (views, copies, misalignment, empties, table packing, partial slots) + index model,
    on host memory: must equal the reference exactly as a reduction of the same numbers."""
    launched = _emulated_launchers(monkeypatch)
    torch.manual_seed(5)
    c = R.CHUNK
    base = torch.randn(3 * c)
    xs = [base[:c // 4 + 3], base[1:c // 2 + 2], torch.randn(64, 33).t(), torch.randn(40, 9)[:, 2:7],
          torch.empty(0), torch.randn(7).bfloat16(), torch.randn(5000).half()[3:], torch.randn(1, 1),
          torch.randn(9, 1).expand(9, 5), torch.randn(2 * c + 1)]
    for order in (1, 2):
        out = R._reduce(xs, torch.device("cpu"), R.SUM_KINDS, f"l{order}", "f64", torch.float32)
        torch.testing.assert_close(out, ref_batch_sum_with_ord(xs, order), rtol=1e-6, atol=0)
    assert launched[-1][:4] == ("l2", 16, "bf16_f16_f32", 9)  # the empty tensor has no entry

    ys = [torch.randint(-1, 2, (n,)).to(dtype) for n, dtype in
          ((c + 17, torch.int8), (999, torch.int16), (4097, torch.int32), (33, torch.int64), (77, torch.bool))]
    ys += [torch.tensor([0.0, -0.0, 1.0, float("nan")] * 300)[1:].to(dtype)
           for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, FP8, torch.float8_e5m2)]
    ys += [ys[2].view(-1, 1)[::2], torch.zeros(3, 2, dtype=torch.float8_e4m3fnuz)]
    out = R._reduce(ys, torch.device("cpu"), R.ZERO_KINDS, "zero", "i64", torch.int64)
    assert out.dtype == torch.int64 and int(out) == int(ref_batch_count_zero(ys))

    many = [torch.randn(n) for n in torch.randint(0, 40, (2300,)).tolist()]
    before = len(launched)
    out = R._reduce(many, torch.device("cpu"), R.SUM_KINDS, "l2", "f64", torch.float32)
    torch.testing.assert_close(out, ref_batch_sum_with_ord(many, 2), rtol=1e-6, atol=0)
    nonempty = sum(x.numel() > 0 for x in many)
    assert nonempty > 2048 and [(cap, n) for _, cap, _, n, _ in launched[before:]] == [
        (1024, 1024), (1024, 1024), (next(c for c in R.CAPS if c >= nonempty - 2048), nonempty - 2048)]
    empty = R._reduce([torch.empty(0, 3)], torch.device("cpu"), R.SUM_KINDS, "l2", "f64", torch.float32)
    assert float(empty) == 0.0


def test_dense_views_are_read_in_place():
    x = torch.randn(6, 10)
    assert R._dense(x) and R._dense(x.t()) and R._dense(x.view(2, 3, 10).permute(2, 0, 1))
    assert R._dense(x[:1]) and R._dense(x[2:3].t())
    assert not R._dense(x[:, :5]) and not R._dense(x[::2]) and not R._dense(x[:, :1].expand(6, 4))


def _cpu_list():
    return [torch.randn(3, 4), torch.randn(5, dtype=torch.bfloat16)]


@pytest.mark.parametrize("call, exc, word", [
    (lambda xs: sum_ord(xs[0]), TypeError, "xs must be a list"),
    (lambda xs: sum_ord(iter(xs)), TypeError, "xs must be a list"),
    (lambda xs: sum_ord([xs[0], 3.0]), TypeError, r"xs\[1\]"),
    (lambda xs: sum_ord([xs[0], xs[1].int()]), TypeError, r"xs\[1\]"),
    (lambda xs: sum_ord([xs[0].double()]), TypeError, r"xs\[0\]"),
    (lambda xs: sum_ord([xs[0], xs[0].to_sparse()]), TypeError, r"xs\[1\] must be a dense"),
    (lambda xs: sum_ord(xs, ord=3), ValueError, "ord"),
    (lambda xs: sum_ord(xs, ord=0), ValueError, "ord"),
    (lambda xs: sum_ord(xs, ord="2"), TypeError, "ord"),
    (lambda xs: sum_ord(xs, ord=True), TypeError, "ord"),
    (lambda xs: sum_ord([], ord=-1), ValueError, "ord"),
    (lambda xs: sum_ord(xs), ValueError, r"xs\[0\] must be a CUDA tensor"),
    (lambda xs: sum_ord(xs, ord=1.0), ValueError, r"xs\[0\] must be a CUDA tensor"),
    (lambda xs: count_zero((xs[0], None)), TypeError, r"xs\[1\]"),
    (lambda xs: count_zero([xs[0], torch.zeros(2, dtype=torch.complex64)]), TypeError, r"xs\[1\]"),
    (lambda xs: count_zero(xs[0]), TypeError, "xs must be a list"),
    (lambda xs: count_zero(xs + [torch.zeros(2, dtype=torch.int32)]), ValueError, r"xs\[0\] must be a CUDA"),
])
def test_bad_input_is_named(call, exc, word):
    with pytest.raises(exc, match=word):
        call(_cpu_list())


def test_empty_list_is_zero():
    s, c = sum_ord([]), count_zero(())
    assert s.shape == () and s.dtype == torch.float32 and float(s) == 0.0
    assert c.shape == () and c.dtype == torch.int64 and int(c) == 0


def test_alias_module_is_the_same():
    import linghe.util.reduce as alias

    assert alias.triton_batch_sum_with_ord is sum_ord and alias.triton_batch_count_zero is count_zero


def test_references_match_independent_formulation():
    torch.manual_seed(0)
    xs = [torch.randn(7, 9), torch.randn(13).bfloat16(), torch.empty(0, 4), torch.randn(3, 2).half()]
    for order in (1, 2):
        expected = math.fsum(float(v) ** order for x in xs for v in x.double().abs().flatten())
        assert float(ref_batch_sum_with_ord(xs, order)) == pytest.approx(expected, rel=1e-6)
    z = torch.tensor([0.0, -0.0, 1.0, float("nan"), float("-inf"), 0.0])
    ints = torch.tensor([0, 3, 0, -1], dtype=torch.int16)
    fp8 = torch.tensor([0.0, -0.0, 0.5, 1.0]).to(FP8)
    flags = torch.tensor([True, False, False])
    count = ref_batch_count_zero([z, ints, fp8, flags])
    assert count.dtype == torch.int64 and int(count) == 3 + 2 + 2 + 2
    assert int(ref_batch_count_zero([])) == 0 and float(ref_batch_sum_with_ord([])) == 0.0


# ---------------------------------------------------------------- GPU -------
def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _tensor(shape, dtype, g, zeros=0.0):
    """Random data (heavy-tailed, never all zero); with ``zeros`` > 0 that fraction set to +0/-0."""
    x = torch.randn(shape, device="cuda", generator=g) * torch.exp(torch.randn(shape, device="cuda", generator=g))
    if zeros:
        mask = torch.rand(shape, device="cuda", generator=g) < zeros
        sign = torch.rand(shape, device="cuda", generator=g) < 0.5
        x = torch.where(mask, torch.where(sign, -0.0, 0.0), x)
    return x.to(dtype)


def _sizes(g_cpu, count):
    c = R.CHUNK
    fixed = [0, 1, 3, 7, 8, 4095, c // 4 - 1, c // 4 + 1, c // 2 + 3, 2 * c + 5, (1 << 20) + 7, 123457]
    return [fixed[i] if i < len(fixed) else g_cpu.randint(0, 70000) for i in range(count)]


def _mixed_list(dtypes, count, seed, zeros=0.0):
    """Tensors of many sizes, some misaligned (flat views at an element offset), some strided."""
    g, rng = _gen(seed), random.Random(seed)
    xs = []
    for i, n in enumerate(_sizes(rng, count)):
        dtype = dtypes[i % len(dtypes)]
        style = i % 5
        if style == 1 and n > 0:  # a view that starts off a 16-byte boundary
            shift = rng.randint(1, 7)
            xs.append(_tensor((n + shift,), dtype, g, zeros)[shift:])
        elif style == 2 and n >= 8:  # transposed: dense, read in place
            xs.append(_tensor((8, n // 8), dtype, g, zeros).t())
        elif style == 3 and n >= 4:  # column slice: gaps, copied
            xs.append(_tensor((n // 4, 6), dtype, g, zeros)[:, 1:5])
        else:
            xs.append(_tensor((n,), dtype, g, zeros))
    return xs


SUM_SETS = [[torch.float32], [torch.bfloat16], [torch.float16], [torch.bfloat16, torch.float32, torch.float16]]


@pytest.mark.gpu
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("dtypes", SUM_SETS, ids=lambda d: "+".join(str(t)[6:] for t in d))
def test_sum_against_reference(order, dtypes):
    xs = _mixed_list(dtypes, 40, seed=order * 10 + len(dtypes))
    before = [x.clone() for x in xs]
    out = sum_ord(xs, order)
    assert out.shape == () and out.dtype == torch.float32 and out.device == xs[0].device
    torch.testing.assert_close(out, ref_batch_sum_with_ord(xs, order), rtol=1e-5, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(xs, before))


COUNT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, FP8, torch.float8_e5m2,
                torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


def _count_case(dtype, seed):
    if dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool):
        g = _gen(seed)
        xs = []
        for n in _sizes(random.Random(seed), 20):
            values = torch.randint(-3, 4, (n + 1,), device="cuda", generator=g)
            xs.append((values > 0 if dtype == torch.bool else values.to(dtype))[1:])  # odd offsets too
        return xs
    xs = _mixed_list([dtype], 20, seed, zeros=0.01)
    if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):  # NaN is not zero; a NaN next to a zero must not count
        xs[5].view(-1)[:2] = float("nan")
    return xs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", COUNT_DTYPES, ids=str)
def test_count_zero_against_reference(dtype):
    xs = _count_case(dtype, seed=COUNT_DTYPES.index(dtype))
    out = count_zero(xs)
    assert out.shape == () and out.dtype == torch.int64 and out.device == xs[0].device
    expected = ref_batch_count_zero(xs)
    assert int(expected) > 0
    assert int(out) == int(expected)


@pytest.mark.gpu
def test_count_zero_mixed_dtypes_and_wide_unsigned():
    xs = []
    for i, dtype in enumerate(COUNT_DTYPES):
        xs += _count_case(dtype, seed=100 + i)[:6]
    for name, signed in (("uint16", torch.int16), ("uint32", torch.int32), ("uint64", torch.int64)):
        if hasattr(torch, name):
            xs.append(torch.randint(-2, 3, (5001,), device="cuda").to(signed).view(getattr(torch, name)))
    random.Random(0).shuffle(xs)
    assert int(count_zero(xs)) == int(ref_batch_count_zero(xs))


@pytest.mark.gpu
def test_negative_zero_nan_and_denormals():
    # 1e-45 is a nonzero denormal in fp32/fp64 but rounds to (+/-)0 in bf16/fp16; -NaN has only the sign set
    # beyond a NaN's bits, so masking the sign must not make it zero.
    x = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), 1e-45, -1e-45, float("inf")] * 37, device="cuda")
    for dtype, zeros in ((torch.float32, 2), (torch.float64, 2), (torch.bfloat16, 4), (torch.float16, 4)):
        assert int(count_zero([x.to(dtype)])) == zeros * 37 == int(ref_batch_count_zero([x.to(dtype)]))


@pytest.mark.gpu
def test_results_are_bitwise_deterministic():
    xs = _mixed_list([torch.float32, torch.bfloat16], 64, seed=7)
    xs += [_tensor((3_000_000,), torch.float32, _gen(8))]
    first = [sum_ord(xs, 2), sum_ord(xs, 1), count_zero(xs)]
    for _ in range(4):
        again = [sum_ord(xs, 2), sum_ord(xs, 1), count_zero(xs)]
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@pytest.mark.parametrize("count", [1, 2, 16, 17, 1023, 1024, 1025, 2600])
def test_list_lengths_and_table_buckets(count):
    g, rng = _gen(count), random.Random(count)
    xs = [_tensor((rng.randint(0, 3000),), torch.float32 if i % 3 else torch.bfloat16, g, zeros=0.05)
          for i in range(count)]
    torch.testing.assert_close(sum_ord(xs, 2), ref_batch_sum_with_ord(xs, 2), rtol=1e-5, atol=0)
    assert int(count_zero(xs)) == int(ref_batch_count_zero(xs))


@pytest.mark.gpu
def test_benchmark_shape_spec_case():
    # SPEC §4.11/§4.12: 32 x [4096, 8192] fp32 made as randn -> fp8 -> fp32 (about 0.08% exact zeros).
    g = _gen(2024)
    xs = [torch.randn(4096, 8192, device="cuda", generator=g).to(FP8).float() for _ in range(32)]
    torch.testing.assert_close(sum_ord(xs, 2), ref_batch_sum_with_ord(xs, 2), rtol=1e-5, atol=0)
    torch.testing.assert_close(sum_ord(xs, 1), ref_batch_sum_with_ord(xs, 1), rtol=1e-5, atol=0)
    assert int(count_zero(xs)) == int(ref_batch_count_zero(xs)) > 0


@pytest.mark.gpu
def test_empty_lists_and_empty_tensors():
    s, c = sum_ord([]), count_zero([])
    assert s.is_cuda and float(s) == 0.0 and c.is_cuda and int(c) == 0
    empties = [torch.empty(0, device="cuda"), torch.empty(3, 0, device="cuda", dtype=torch.bfloat16)]
    s = sum_ord(empties)
    assert s.shape == () and s.dtype == torch.float32 and float(s) == 0.0
    assert int(count_zero(empties)) == 0


@pytest.mark.gpu
def test_mixed_devices_rejected_before_launch():
    xs = [torch.randn(10, device="cuda"), torch.randn(10)]
    with pytest.raises(ValueError, match=r"xs\[1\] must be a CUDA tensor"):
        sum_ord(xs)
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        count_zero(xs)
    if torch.cuda.device_count() > 1:
        ys = [torch.randn(10, device="cuda:0"), torch.randn(10, device="cuda:1")]
        with pytest.raises(ValueError, match=r"xs\[1\] is on cuda:1"):
            sum_ord(ys)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_output_on_input_device_not_current():
    xs = [torch.randn(5000, device="cuda:1"), torch.randn(77, 3, device="cuda:1").t()]
    with torch.cuda.device(0):
        out = sum_ord(xs)
        assert out.device == torch.device("cuda:1")
        torch.testing.assert_close(out, ref_batch_sum_with_ord(xs), rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    xs = _mixed_list([torch.float32, torch.bfloat16], 24, seed=31, zeros=0.01)  # views of every style
    sum_ord(xs, 2), count_zero(xs)  # compile and load outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s, c = sum_ord(xs, 2), count_zero(xs)
    g = _gen(32)
    for x in xs:  # new values in the same storage: the replay must read them
        x.copy_(_tensor(x.shape, x.dtype, g, zeros=0.02))
    s.fill_(float("nan"))
    c.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(s, ref_batch_sum_with_ord(xs, 2), rtol=1e-5, atol=0)
    assert int(c) == int(ref_batch_count_zero(xs))


@pytest.mark.gpu
def test_side_stream_launch():
    xs = _mixed_list([torch.float32], 12, seed=41)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = sum_ord(xs, 2)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, ref_batch_sum_with_ord(xs, 2), rtol=1e-5, atol=0)
