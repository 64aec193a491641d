"""Reductions over a whole list of tensors in one pass (SPEC.md §4.11, §4.12).

``triton_batch_sum_with_ord`` and ``triton_batch_count_zero`` launch one stage-1 kernel for up to
``MAX_ENTRIES`` non-empty tensors (more take one launch per ``MAX_ENTRIES``) and one tiny combine
kernel. The list reaches the GPU as a by-value kernel parameter (a table of (pointer, numel,
first chunk, kind) entries, sized to a capacity bucket), so there is no host->device copy, no
host sync and the call can be captured in a CUDA graph. Stage 1 writes one partial per CTA into a
fresh buffer; the combine adds them in a fixed order in fp64 (or int64), so results are bitwise
reproducible on a device. A second kernel rather than a last-block-done counter: a counter needs
zeroed memory that outlives the call, which two streams (or a graph replayed beside eager calls)
would share.
"""
from __future__ import annotations

import ctypes
import numbers

import torch

from ..kernel import Kernel, register_prewarm

THREADS, UNROLL = 256, 8
CHUNK = THREADS * UNROLL * 16   # bytes of one work unit (template: CHUNK)
CTAS_PER_SM = 4                 # 1024 threads and 128 KiB of loads in flight per SM
CAPS = (16, 64, 256, 1024)      # table capacities; 1024 entries = 24 KiB of kernel parameters
MAX_ENTRIES = CAPS[-1]

# Kinds: the element formats stage 1 distinguishes, each with its element size in bytes.
SUM_KINDS = {torch.float32: ("f32", 4), torch.bfloat16: ("bf16", 2), torch.float16: ("f16", 2)}
# count_zero compares bits: integers/bool are zero when all bits are ("zN"), floating types when
# all bits but the sign are ("zNs"). fnuz fp8 formats have no negative zero (0x80 is their NaN).
ZERO_KINDS = {torch.bool: ("z1", 1), torch.uint8: ("z1", 1), torch.int8: ("z1", 1),
              torch.int16: ("z2", 2), torch.int32: ("z4", 4), torch.int64: ("z8", 8),
              torch.float16: ("z2s", 2), torch.bfloat16: ("z2s", 2), torch.float32: ("z4s", 4),
              torch.float64: ("z8s", 8)}
for _name, _kind in (("uint16", ("z2", 2)), ("uint32", ("z4", 4)), ("uint64", ("z8", 8)),
                     ("float8_e4m3fn", ("z1s", 1)), ("float8_e5m2", ("z1s", 1)),
                     ("float8_e4m3fnuz", ("z1", 1)), ("float8_e5m2fnuz", ("z1", 1))):
    if hasattr(torch, _name):
        ZERO_KINDS[getattr(torch, _name)] = _kind
del _name, _kind

_CTYPES = {"f32": "Sum<f32_t>", "bf16": "Sum<bf16_t>", "f16": "Sum<f16_t>",
           "z1": "Zero<1, false>", "z2": "Zero<2, false>", "z4": "Zero<4, false>", "z8": "Zero<8, false>",
           "z1s": "Zero<1, true>", "z2s": "Zero<2, true>", "z4s": "Zero<4, true>", "z8s": "Zero<8, true>"}
_OP_KINDS = {"l1": {"f32", "bf16", "f16"}, "l2": {"f32", "bf16", "f16"},
             "zero": {"z1", "z2", "z4", "z8", "z1s", "z2s", "z4s", "z8s"}}


def _stage1_context(OP, CAP, KINDS):
    kinds = KINDS.split("_")
    if OP not in _OP_KINDS:
        raise ValueError(f"batch_reduce: OP must be one of {sorted(_OP_KINDS)}, got {OP!r}")
    if CAP not in CAPS:
        raise ValueError(f"batch_reduce: CAP must be one of {CAPS}, got {CAP!r}")
    if kinds != sorted(set(kinds)) or not set(kinds) <= _OP_KINDS[OP]:
        raise ValueError(f"batch_reduce: KINDS must be distinct, sorted, '_'-joined kinds of "
                         f"{sorted(_OP_KINDS[OP])} for OP={OP}, got {KINDS!r}")
    return {"STAGE": 1, "THREADS": THREADS, "UNROLL": UNROLL, "MIN_BLOCKS": CTAS_PER_SM,
            "KIND_CTYPES": [_CTYPES[k] for k in kinds]}


def _combine_context(ACC):
    if ACC not in ("f64", "i64"):
        raise ValueError(f"batch_reduce_combine: ACC must be 'f64' or 'i64', got {ACC!r}")
    return {"STAGE": 2}


BATCH_REDUCE = Kernel(
    op="batch_reduce",
    template="reduce.cu.j2",
    entry="linghe_batch_reduce",
    params=("OP", "CAP", "KINDS"),
    arg_types=("struct", "ptr"),  # the table by value, the partials
    context=_stage1_context,
)

BATCH_COMBINE = Kernel(
    op="batch_reduce_combine",
    template="reduce.cu.j2",
    entry="linghe_batch_reduce_combine",
    params=("ACC",),
    arg_types=("ptr", "i32", "ptr"),
    context=_combine_context,
)


def _table_type(cap: int):
    """The ctypes twin of the template's ``Table``: ``Entry{u64 ptr; i64 n; u32 chunk0; u32 tag}[cap]``,
    then ``u32 count, total``. An entry is three u64 words, the third ``chunk0 | tag << 32``."""
    return type(f"ReduceTable{cap}", (ctypes.Structure,),
                {"_fields_": [("words", ctypes.c_uint64 * (3 * cap)), ("count", ctypes.c_uint32),
                              ("total", ctypes.c_uint32)]})


TABLES = {cap: _table_type(cap) for cap in CAPS}


def plan(entries):
    """Split ``entries`` [(ptr, numel, kind, element_size)] (numel > 0) into launches.

    Returns ``[(cap, kinds, words, total_chunks)]``: per launch the table capacity, the KINDS
    constant, the table words and the number of chunks. Mirrors the template's chunking: an
    entry's body starts at its first 16-byte boundary (the head elements before it go with chunk
    0) and has ``max(1, cdiv(body_bytes, CHUNK))`` chunks.
    """
    launches = []
    for start in range(0, len(entries), MAX_ENTRIES):
        group = entries[start:start + MAX_ENTRIES]
        kinds = sorted({entry[2] for entry in group})
        tags = {kind: i << 32 for i, kind in enumerate(kinds)}
        words, chunk = [], 0
        append = words.append  # this loop is the per-tensor host cost: keep it lean
        for ptr, n, kind, es in group:
            head = ((-ptr) & 15) // es
            append(ptr)
            append(n)
            append(chunk | tags[kind])
            chunk += ((n - head) * es + CHUNK - 1) // CHUNK if n > head else 1
        if chunk >= 1 << 32:
            raise ValueError(f"xs: {chunk * CHUNK} bytes in one launch exceed what the chunk numbering supports")
        cap = next(c for c in CAPS if c >= len(group))
        launches.append((cap, "_".join(kinds), words, chunk))
    return launches


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill exactly numel consecutive slots from data_ptr (any dim order):
    order does not matter to a sum or a count, so such a view needs no copy."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _validated(xs, kinds: dict):
    """Types and dtypes of every element first, then their devices (SPEC order: CPU tests reach
    every check). Returns the device, or None for an empty list."""
    if not isinstance(xs, (list, tuple)):
        raise TypeError(f"xs must be a list or tuple of tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"xs[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.layout is not torch.strided:
            raise TypeError(f"xs[{i}] must be a dense (strided) tensor, got layout {x.layout}")
        if x.dtype not in kinds:
            names = ", ".join(sorted({str(d).replace("torch.", "") for d in kinds}))
            raise TypeError(f"xs[{i}] must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    first = None
    for i, x in enumerate(xs):
        index = x.get_device() if x.is_cuda else -1
        if index < 0:
            raise ValueError(f"xs[{i}] must be a CUDA tensor, got device {x.device}")
        if first is None:
            first = index
        elif index != first:
            raise ValueError(f"xs[{i}] is on {x.device} but xs[0] is on cuda:{first}")
    return None if first is None else xs[0].device


_sm_counts: dict[int, int] = {}


def _reduce(xs, device, kinds: dict, op: str, acc: str, out_dtype):
    keep = []  # copies must outlive the launches that read them
    entries = []
    for x in xs:
        n = x.numel()
        if n == 0:
            continue
        if not x.is_contiguous() and not _dense(x):
            x = x.contiguous()  # gaps or overlaps (slices, expand): one copy, then a flat read
            keep.append(x)
        kind, es = kinds[x.dtype]
        ptr = x.data_ptr()
        if ptr % es:  # misaligned for its own element type (only through unusual views)
            x = x.clone(memory_format=torch.contiguous_format)
            keep.append(x)
            ptr = x.data_ptr()
        entries.append((ptr, n, kind, es))

    launches = plan(entries)
    index = device.index
    sms = _sm_counts.get(index)
    if sms is None:
        sms = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    grids = [min(sms * CTAS_PER_SM, total) for _, _, _, total in launches]
    partials = torch.empty((sum(grids),), dtype=torch.float64 if acc == "f64" else torch.int64, device=device)
    out = torch.empty((), dtype=out_dtype, device=device)
    base = partials.data_ptr()
    for (cap, kinds_key, words, total), grid in zip(launches, grids):
        table = TABLES[cap]()
        table.words[:len(words)] = words
        table.count, table.total = len(words) // 3, total
        launch = BATCH_REDUCE.launcher(device, op, cap, kinds_key)
        launch((grid, 1, 1), (THREADS, 1, 1), (table, base))
        base += grid * 8
    BATCH_COMBINE.launcher(device, acc)((1, 1, 1), (512, 1, 1), (partials.data_ptr(), partials.numel(),
                                                                 out.data_ptr()))
    del keep
    return out


def _empty_list_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def triton_batch_sum_with_ord(xs, ord=2):
    """``Σ_tensors Σ_elements |x|^ord`` over the list ``xs`` as a 0-d fp32 tensor (no root taken).

    ``ord`` is 1 (sum of ``|x|``) or 2 (sum of squares). Tensors may be fp32, bf16 or fp16 (mixed),
    of any shape, strided or empty; non-contiguous tensors are read in place when their elements
    are dense in memory (e.g. transposes) and copied once otherwise. An empty list gives 0 (on the
    current CUDA device). fp32 within 64-element runs, fp64 beyond; bitwise reproducible.
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_batch_sum_with_ord(xs, ord)
    if isinstance(ord, bool) or not isinstance(ord, numbers.Real):
        raise TypeError(f"ord must be 1 or 2, got {type(ord).__name__} {ord!r}")
    if ord not in (1, 2):
        raise ValueError(f"ord must be 1 (sum of |x|) or 2 (sum of squares), got {ord!r}")
    device = _validated(xs, SUM_KINDS)
    if device is None:
        return torch.zeros((), dtype=torch.float32, device=_empty_list_device())
    return _reduce(xs, device, SUM_KINDS, "l1" if ord == 1 else "l2", "f64", torch.float32)


def triton_batch_count_zero(xs):
    """The number of elements equal to zero (+0 and -0; not NaN) across ``xs``, as a 0-d int64 tensor.

    Any floating dtype (fp32/bf16/fp16/fp64/fp8), integer or bool tensors (``== 0``), mixed, any
    shape, strided or empty. An empty list gives 0 (on the current CUDA device).
    """
    if torch.compiler.is_compiling():  # traced as the registered operator (linghe/library.py)
        from .. import library
        return library.triton_batch_count_zero(xs)
    device = _validated(xs, ZERO_KINDS)
    if device is None:
        return torch.zeros((), dtype=torch.int64, device=_empty_list_device())
    return _reduce(xs, device, ZERO_KINDS, "zero", "i64", torch.int64)


_GRAD_KINDS = {"bf16": ("bf16", "z2s"), "f16": ("f16", "z2s"), "f32": ("f32", "z4s")}


@register_prewarm("batch_reduce")
def _prewarm(preset):
    """Gradient norms and zero counts over fp32 (main grads) and activation-dtype gradient lists."""
    grad_sum, grad_zero = _GRAD_KINDS[preset["dtype"]]
    sum_sets = sorted({"f32", grad_sum, "_".join(sorted({"f32", grad_sum}))})
    zero_sets = sorted({"z4s", grad_zero, "_".join(sorted({"z4s", grad_zero}))})  # lists may mix both
    for cap in CAPS:
        for kinds in sum_sets:
            yield BATCH_REDUCE, dict(OP="l2", CAP=cap, KINDS=kinds)
        for kinds in zero_sets:
            yield BATCH_REDUCE, dict(OP="zero", CAP=cap, KINDS=kinds)
    yield BATCH_COMBINE, dict(ACC="f64")
    yield BATCH_COMBINE, dict(ACC="i64")
