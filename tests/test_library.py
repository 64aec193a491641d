"""torch.library registration (linghe/library.py) and torch.compile.

CPU: the registry, importing linghe stays light, every documented function routes to its operator
under compile and gets the documented shapes from the fake implementations, and dynamo traces the
functions and the autograd Functions with fullgraph=True (CPU kernels that return zeros stand in
for the CUDA ones). GPU: ``torch.library.opcheck`` of every operator, and compiled vs eager results.
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_same

FP8, F32, BF16, I64 = torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.int64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OP_NAMES = (
    "rms_norm_block_quant", "silu_block_quant_forward", "silu_block_quant_backward",
    "batch_silu_block_quant_forward", "batch_silu_block_quant_backward", "permute_with_mask_map",
    "unpermute_with_mask_map", "qk_norm_half_rope_forward", "qk_norm_half_rope_backward",
    "group_norm_gate_forward", "group_norm_gate_backward", "fp32_gemm_forward", "fp32_gemm_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "batch_sum_with_ord", "batch_count_zero",
)
SPLITS = [100, 0, 37, 120]  # 257 rows; 3 transposed-scale row blocks


def _structure(out):
    """(shape, dtype) per output, None kept (a 0-d tensor is one output too)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [None if t is None else (tuple(t.shape), t.dtype) for t in outs]


# ---- CPU: registry and imports ------------------------------------------------------------------
def test_import_is_light_and_eager_calls_bypass_the_dispatcher():
    code = """
import sys, torch
before = set(sys.modules)
import linghe
from linghe.utils import norm, silu, gather, scatter, rope, norm_gate, fp32_gemm, loss, reduce
from linghe.util import silu as _s
from linghe.facade import rope as _r, norm as _n, fp32_linear as _f, loss as _l
try:  # an eager call takes the direct path: its own device check, not a dispatcher error
    norm.triton_rms_norm_and_block_quant_forward(torch.ones(4, 128), torch.ones(128))
except ValueError as e:
    assert "CUDA" in str(e), e
new = set(sys.modules) - before
# (linghe.runtime imports the driver bindings on purpose, so cuda.* may appear; the registry must not)
print(sorted(m for m in new if m in ("linghe.library", "torch._dynamo")))
print(torch.cuda.is_initialized())
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "False"], run.stdout


def test_every_kernel_entry_point_is_registered():
    from linghe import library

    assert tuple(library.OPS) == OP_NAMES
    for name in OP_NAMES:
        op = getattr(torch.ops.linghe, name).default
        assert library.OPS[name] is op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"linghe::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"linghe::{name}", "Meta"), name  # the fake
        assert torch.Tag.pt2_compliant_tag in op.tags
        # functional: no argument is written and no output aliases an input
        assert not any(a.alias_info is not None for a in op._schema.arguments), name
        assert not any(r.alias_info is not None for r in op._schema.returns), name


# ---- CPU: routing and fake shapes (FakeTensorMode, is_compiling() forced on) ----------------------
def _fake_cases(dev):
    """label -> (call, expected _structure). Tensors are made inside FakeTensorMode."""
    from linghe.utils import fp32_gemm, gather, loss, norm, norm_gate, reduce, rope, scatter, silu

    def t(*shape, dtype=BF16):
        return torch.empty(shape, dtype=dtype, device=dev)

    x, w = t(300, 1024), t(1024)
    x2, g2 = t(257, 1024), t(257, 512)
    xb, gb, wb, counts = t(257, 512), t(257, 256), t(257, 1, dtype=F32), t(4, dtype=torch.int32)
    rid, inp = t(6, 4, dtype=torch.int32), t(6, 256)
    qkv, qw, kw, fr = t(8, 2, 512), t(64, dtype=F32), t(64), t(8, 32, dtype=F32)
    gq, gk = t(2, 8, 4, 64), t(2, 8, 2, 64)
    xg, gate, wg = t(2, 8, 256), t(8, 2, 256), t(256, dtype=F32)
    xi, wi, go = t(2, 8, 128), t(32, 128), t(2, 8, 32, dtype=F32)
    logits, labels = t(2, 8, 300), t(2, 8, dtype=I64)
    nq = [((300, 1024), FP8), ((8, 300), F32), ((300,), F32)]
    nt = [((1024, 300), FP8), ((3, 1024), F32)]
    sq = [((257, 512), FP8), ((4, 257), F32), ((512, 257), FP8), ((3, 512), F32)]
    norm_f, silu_f = norm.triton_rms_norm_and_block_quant_forward, silu.triton_silu_and_block_quant_forward
    return {
        "norm mode 0": (lambda: norm_f(x, w, round_scale=True, output_mode=0), nq + nt),
        "norm mode 1": (lambda: norm_f(x, w, rms=t(300, dtype=F32), output_mode=1), [None, None, ((300,), F32)] + nt),
        "norm mode 2": (lambda: norm_f(x, w, 1e-5, output_mode=2), nq + nt),
        "silu mode 0": (lambda: silu_f(x2, output_mode=0), sq),
        "silu mode 1": (lambda: silu_f(x2, round_scale=True, output_mode=1), sq),
        "silu mode 2": (lambda: silu_f(x2), sq),
        "silu backward": (lambda: silu.triton_silu_and_block_quant_backward(g2, x2, True),
                          [((257, 1024), FP8), ((8, 257), F32), ((1024, 257), FP8), ((3, 1024), F32)]),
        "batch silu mode 2": (lambda: silu.triton_batch_weighted_silu_and_block_quant_forward(xb, wb, counts, SPLITS),
                              [((257, 256), FP8), ((514,), F32), ((65792,), FP8), ((768,), F32)]),
        "batch silu mode 0": (
            lambda: silu.triton_batch_weighted_silu_and_block_quant_forward(xb, wb, counts, SPLITS, output_mode=0),
            [((257, 256), FP8), ((514,), F32), ((65792,), FP8), ((768,), F32)]),
        "batch silu backward": (
            lambda: silu.triton_batch_weighted_silu_and_block_quant_backward(gb, xb, wb, counts, SPLITS, True),
            [((257, 512), FP8), ((1028,), F32), ((257, 1), F32), ((131584,), FP8), ((1536,), F32)]),
        "permute": (lambda: gather.triton_permute_with_mask_map(inp, t(6, dtype=F32), t(6, 4, dtype=F32), rid, 9),
                    [((9, 256), BF16), ((9,), F32), ((9,), F32)]),
        "permute block scales": (
            lambda: gather.triton_permute_with_mask_map(inp, t(6, 2, dtype=F32), None, rid, 16, False, t(4, dtype=I64)),
            [((16, 256), BF16), ((16, 2), F32), None]),
        "unpermute": (lambda: scatter.triton_unpermute_with_mask_map(t(9, 256), rid, t(9, dtype=F32)),
                      [((6, 256), BF16), ((6, 4), F32)]),
        "unpermute no probs": (lambda: scatter.triton_unpermute_with_mask_map(t(9, 256), rid, None),
                               [((6, 256), BF16), None]),
        "rope forward": (lambda: rope.qk_norm_half_rope_forward(qkv, qw, kw, fr, 4, 2),
                         [((2, 8, 4, 64), BF16), ((2, 8, 2, 64), BF16), ((2, 8, 2, 64), BF16)]),
        "rope backward": (lambda: rope.qk_norm_half_rope_backward(gq, gk, gk, qkv, qw, kw, fr, 4, 2),
                          [((8, 2, 512), BF16), ((64,), F32), ((64,), BF16)]),
        "gate forward": (lambda: norm_gate.group_norm_gate_forward(xg, gate, wg), [((8, 2, 256), BF16)]),
        "gate backward": (lambda: norm_gate.group_norm_gate_backward(gate, t(2, 8, 4, 64), gate, wg, 1e-6, 4),
                          [((2, 8, 4, 64), BF16), ((8, 2, 256), BF16), ((256,), F32)]),
        "gemm forward": (lambda: fp32_gemm.fp32_gemm_forward(xi, wi), [((2, 8, 32), F32)]),
        "gemm backward": (lambda: fp32_gemm.fp32_gemm_backward(go, xi, wi), [((2, 8, 128), BF16), ((32, 128), BF16)]),
        "gemm backward dx fp32": (lambda: fp32_gemm.fp32_gemm_backward(go, xi, wi, True, False, grad_dtype=F32),
                                  [((2, 8, 128), F32), None]),
        "cross entropy forward": (lambda: loss.softmax_cross_entropy_forward(logits, labels),
                                  [((2, 8), F32), ((16, 2), F32)]),
        "cross entropy backward": (
            lambda: loss.softmax_cross_entropy_backward(logits, labels, t(16, 2, dtype=F32), t(2, 8, dtype=F32)),
            [((2, 8, 300), BF16)]),
        "sum with ord": (lambda: reduce.triton_batch_sum_with_ord([t(10, 3, dtype=F32), t(7), t(0)], 1), [((), F32)]),
        "count zero": (lambda: reduce.triton_batch_count_zero([t(10, 3, dtype=F32), t(7, dtype=FP8)]), [((), I64)]),
        "count zero empty": (lambda: reduce.triton_batch_count_zero([]), [((), I64)]),
    }


@pytest.fixture
def compiling(monkeypatch):
    """The documented functions behave as while dynamo traces them; FakeTensorMode gives tensors
    without memory, so any eager kernel path would fail at its first data_ptr."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import linghe.library  # noqa: F401  (registered before the mode starts)

    # the flag is_compiling() returns (patching the function itself would confuse dynamo's trace rules
    # if dynamo is first imported meanwhile)
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling()
    with FakeTensorMode():
        yield


@pytest.mark.parametrize("label", list(_fake_cases("meta")))
def test_documented_functions_route_to_fake_shapes(compiling, label):
    # fake CUDA tensors (a CPU-only torch can make them): outputs must be on the input's device
    call, expected = _fake_cases("cuda")[label]
    out = call()
    assert _structure(out) == expected
    for o in (out if isinstance(out, tuple) else (out,)):
        if o is not None and label != "count zero empty":
            assert o.device.type == "cuda" and o.is_contiguous()


def test_compile_path_errors(compiling):
    from linghe.utils import gather, norm, silu

    x = torch.empty(300, 1024, dtype=BF16, device="cuda")
    with pytest.raises(ValueError, match="splits"):
        silu.triton_batch_weighted_silu_and_block_quant_forward(
            torch.empty(257, 512, dtype=BF16, device="cuda"), torch.empty(257, device="cuda"),
            torch.empty(4, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="num_out_tokens"):
        gather.triton_permute_with_mask_map(x, None, None, torch.empty(300, 4, dtype=torch.int32, device="cuda"),
                                            None)
    with pytest.raises(ValueError, match="rms is required"):
        norm.triton_rms_norm_and_block_quant_forward(x, torch.empty(1024, device="cuda"), output_mode=1)
    with pytest.raises(ValueError, match="multiple of 128"):
        norm.triton_rms_norm_and_block_quant_forward(torch.empty(300, 1000, dtype=BF16, device="cuda"),
                                                     torch.empty(1000, device="cuda"))
    with pytest.raises(ValueError, match="out must have shape"):
        norm.triton_rms_norm_and_block_quant_forward(x, torch.empty(1024, device="cuda"),
                                                     out=torch.empty(300, 512, dtype=FP8, device="cuda"))
    from linghe.facade.loss import SoftmaxCrossEntropyFunction

    with pytest.raises(NotImplementedError, match="tp_group is not supported under torch.compile"):
        SoftmaxCrossEntropyFunction.apply(torch.empty(4, 64, dtype=BF16, device="cuda"),
                                          torch.zeros(4, dtype=torch.int64, device="cuda"), False, object())


def test_caller_buffers_are_written_and_returned(compiling):
    # CPU fake tensors here: a CPU-only torch cannot run copy_ on fake CUDA tensors (the fakes do not
    # look at devices, so the compile path is the same)
    from linghe.utils import loss, norm, silu

    x, w = torch.empty(300, 1024, dtype=BF16), torch.empty(1024, dtype=BF16)
    out, scale, rms = torch.empty(300, 1024, dtype=FP8), torch.empty(300, 8), torch.empty(300)
    q, s, r, _, _ = norm.triton_rms_norm_and_block_quant_forward(x, w, 1e-6, out, scale, rms, True, 2)
    assert q is out and r is rms and s is not scale and s.shape == (8, 300)
    assert norm.triton_rms_norm_and_block_quant_forward(x, w, 1e-6, out, scale, rms, True, 1)[:3] == (out, scale, rms)
    xs = torch.empty(257, 1024, dtype=BF16)
    out, scale = torch.empty(257, 512, dtype=FP8), torch.empty(4, 257)
    for mode in (0, 1, 2):
        q, s, _, _ = silu.triton_silu_and_block_quant_forward(xs, out, scale, True, mode)
        assert q is out and s is scale
    bscale = torch.empty(257, 2)  # any shape with R*n/128 elements
    _, s, _, _ = silu.triton_batch_weighted_silu_and_block_quant_forward(
        torch.empty(257, 512, dtype=BF16), torch.empty(257), torch.empty(4, dtype=I64), SPLITS, scale=bscale)
    assert s is bscale
    logits, labels = torch.empty(16, 300, dtype=BF16), torch.empty(16, dtype=I64)
    grad = loss.softmax_cross_entropy_backward(logits, labels, torch.empty(16, 2), torch.empty(16), True)
    assert grad is logits
    with pytest.raises(ValueError, match="contiguous"):
        loss.softmax_cross_entropy_backward(logits.t().contiguous().t(), labels, torch.empty(16, 2),
                                            torch.empty(16), True)


# ---- CPU: dynamo traces everything with fullgraph=True ----------------------------------------------
def _zero_outputs(fake):
    """A CPU kernel from a fake implementation: its outputs, zero-filled."""
    def kernel(*args):
        out = fake(*args)
        for t in out if isinstance(out, tuple) else (out,):
            (t.view(torch.uint8) if t.dtype == FP8 else t).zero_()
        return out
    return kernel


@pytest.fixture(scope="module")
def cpu_kernels():
    from torch.library import Library

    from linghe import library

    lib = Library("linghe", "FRAGMENT")
    for name, fake in library.FAKES.items():
        if name not in ("batch_sum_with_ord", "batch_count_zero"):  # their fakes insist on CUDA tensors
            lib.impl(name, _zero_outputs(fake), "CPU")
    yield
    lib._destroy()


def compile_recording(fn, backend_name):
    """torch.compile(fn, fullgraph=True) through ``backend_name``; returns (compiled, graphs seen)."""
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(linghe_ops(gm))  # before the backend's passes touch the graph
        return lookup_backend(backend_name)(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=backend), graphs


def linghe_ops(gm):
    """Names of the linghe operators in a dynamo graph, its subgraphs included (autograd.Function bodies)."""
    names = set()
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            names.update(str(n.target).split(".")[1] for n in mod.graph.nodes
                         if n.op == "call_function" and str(n.target).startswith("linghe."))
    return names


def _cpu_trace_cases():
    from linghe.facade.fp32_linear import FusedFp32GEMM
    from linghe.facade.loss import SoftmaxCrossEntropyFunction
    from linghe.facade.norm import GroupNormGateFunction
    from linghe.facade.rope import QkNormHalfRopeFunction
    from linghe.utils import gather, loss, norm, norm_gate, rope, scatter, silu

    r = torch.randn
    rid = torch.tensor([[0, -1], [1, 2], [-1, 3]], dtype=torch.int32)
    return {  # label -> (fn, inputs, expected ops, indices of the inputs to differentiate)
        "norm": (lambda x, w: norm.triton_rms_norm_and_block_quant_forward(x, w, 1e-6, None, None, None, True, 0),
                 (r(5, 256), r(256)), {"rms_norm_block_quant"}, ()),
        "silu": (lambda x, out: silu.triton_silu_and_block_quant_forward(x, out, None, True, 1),
                 (r(5, 512), torch.zeros(5, 256).to(FP8)), {"silu_block_quant_forward"}, ()),
        "batch silu": (lambda g, x, w, c: silu.triton_batch_weighted_silu_and_block_quant_backward(g, x, w, c, [2, 3]),
                       (r(5, 256), r(5, 512), r(5), torch.tensor([2, 3])), {"batch_silu_block_quant_backward"}, ()),
        "permute": (lambda x, p: gather.triton_permute_with_mask_map(x, None, p, rid, 4),
                    (r(3, 128), r(3, 2)), {"permute_with_mask_map"}, ()),
        "unpermute": (lambda g: scatter.triton_unpermute_with_mask_map(g, rid, None), (r(4, 128),),
                      {"unpermute_with_mask_map"}, ()),
        "cross entropy": (lambda x, y: loss.softmax_cross_entropy_backward(
            x, y, loss.softmax_cross_entropy_forward(x, y)[1], torch.ones(4), True), (r(4, 100), torch.arange(4)),
            {"softmax_cross_entropy_forward", "softmax_cross_entropy_backward"}, ()),
        "rope plain": (lambda *a: rope.qk_norm_half_rope_forward(*a, 2, 1), (r(3, 2, 64), r(16), r(16), r(3, 8)),
                       {"qk_norm_half_rope_forward"}, ()),
        "gate plain": (lambda *a: norm_gate.group_norm_gate_forward(*a, 1e-6, 2), (r(2, 3, 64), r(3, 2, 64), r(64)),
                       {"group_norm_gate_forward"}, ()),
        "QkNormHalfRopeFunction": (lambda *a: QkNormHalfRopeFunction.apply(*a, 2, 1, 1e-6),
                                   (r(3, 2, 64), r(16), r(16), r(3, 8)),
                                   {"qk_norm_half_rope_forward", "qk_norm_half_rope_backward"}, (0, 1, 2)),
        "GroupNormGateFunction": (lambda *a: GroupNormGateFunction.apply(*a, 1e-6, 2),
                                  (r(2, 3, 64), r(3, 2, 64), r(64)),
                                  {"group_norm_gate_forward", "group_norm_gate_backward"}, (0, 1, 2)),
        "FusedFp32GEMM": (FusedFp32GEMM.apply, (r(2, 3, 128), r(16, 128)), {"fp32_gemm_forward", "fp32_gemm_backward"},
                          (0, 1)),
        "SoftmaxCrossEntropyFunction": (lambda x, y: SoftmaxCrossEntropyFunction.apply(x, y, True),
                                        (r(2, 3, 100), torch.randint(0, 100, (2, 3))),
                                        {"softmax_cross_entropy_forward", "softmax_cross_entropy_backward"}, (0,)),
    }


@pytest.mark.parametrize("label", ["norm", "silu", "batch silu", "permute", "unpermute", "cross entropy",
                                   "rope plain", "gate plain", "QkNormHalfRopeFunction", "GroupNormGateFunction",
                                   "FusedFp32GEMM", "SoftmaxCrossEntropyFunction"])
def test_dynamo_traces_fullgraph_on_cpu(cpu_kernels, label):
    fn, inputs, ops, differentiate = _cpu_trace_cases()[label]
    leaves = [inputs[i].requires_grad_() for i in differentiate]
    compiled, graphs = compile_recording(fn, "aot_eager")
    out = compiled(*inputs)
    assert graphs == [ops]
    if leaves:
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for t in leaves:  # zeros from the stand-in kernels, in the documented shapes and dtypes
            assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype
            assert not t.grad.any()


# ---- GPU: opcheck of every operator ---------------------------------------------------------------
def _gpu_inputs():
    from linghe.reference import make_row_id_map

    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, dtype=BF16):
        return torch.randn(shape, device="cuda", generator=g).to(dtype)

    routing = torch.rand(300, 16, device="cuda", generator=g) < 0.3
    rid, nout = make_row_id_map(routing)
    rid16, nout16 = make_row_id_map(routing, 16)
    labels = torch.randint(0, 300, (2, 8), device="cuda", generator=g)
    labels[0, 3] = -100  # ignored
    xr = r(300, 1024)
    return dict(
        x=xr, w=r(1024), rms=torch.rsqrt(xr.float().pow(2).mean(1) + 1e-6),
        xs=r(257, 1024), gs=r(257, 512), xb=r(257, 512), gb=r(257, 256), wb=torch.rand(257, 1, device="cuda"),
        counts=torch.tensor(SPLITS, device="cuda", dtype=torch.int32),
        inp=r(300, 512), scale=torch.rand(300, device="cuda"), probs=torch.rand(300, 16, device="cuda"),
        rid=rid, nout=nout, rid16=rid16, nout16=nout16, tpe=routing.sum(0),
        grad=r(nout, 512), pgrad=torch.rand(nout, device="cuda"),
        qkv=r(8, 2, 512), qw=r(64), kw=r(64, dtype=F32), freqs=torch.rand(8, 32, device="cuda") * 3,
        gq=r(2, 8, 4, 64), gk=r(2, 8, 2, 64), gv=r(2, 8, 2, 64),
        xg=r(2, 8, 256), gate=r(8, 2, 256), wg=r(256), ggrad=r(8, 2, 256),
        xi=r(2, 8, 128), wi=r(32, 128), go=r(2, 8, 32, dtype=F32),
        logits=r(2, 8, 300) * 4, labels=labels, lgrad=r(2, 8, dtype=F32),
        lists=[r(100, 3, dtype=F32), r(7, 5), r(33, dtype=torch.float16).relu()],
    )


OPCHECK_CASES = {  # label -> (op name, args from the inputs above)
    "norm mode 0": ("rms_norm_block_quant", lambda d: (d["x"], d["w"], 1e-6, None, True, 0)),
    "norm mode 1": ("rms_norm_block_quant", lambda d: (d["x"], d["w"], 1e-6, d["rms"], False, 1)),
    "norm mode 2": ("rms_norm_block_quant", lambda d: (d["x"], d["w"], 1e-6, None, True, 2)),
    "silu mode 0": ("silu_block_quant_forward", lambda d: (d["xs"], True, 0)),
    "silu mode 1": ("silu_block_quant_forward", lambda d: (d["xs"], False, 1)),
    "silu mode 2": ("silu_block_quant_forward", lambda d: (d["xs"], True, 2)),
    "silu backward": ("silu_block_quant_backward", lambda d: (d["gs"], d["xs"], True)),
    "batch silu mode 0": ("batch_silu_block_quant_forward", lambda d: (d["xb"], d["wb"], d["counts"], SPLITS, True, 0)),
    "batch silu mode 2": ("batch_silu_block_quant_forward", lambda d: (d["xb"], d["wb"], d["counts"], SPLITS, True, 2)),
    "batch silu backward": ("batch_silu_block_quant_backward",
                            lambda d: (d["gb"], d["xb"], d["wb"], d["counts"], SPLITS, True)),
    "permute": ("permute_with_mask_map",
                lambda d: (d["inp"], d["scale"], d["probs"], d["rid"], d["nout"], True, None)),
    "permute padded": ("permute_with_mask_map",
                       lambda d: (d["inp"], None, d["probs"], d["rid16"], d["nout16"], False, d["tpe"])),
    "unpermute": ("unpermute_with_mask_map", lambda d: (d["grad"], d["rid"], d["pgrad"])),
    "unpermute no probs": ("unpermute_with_mask_map", lambda d: (d["grad"], d["rid"], None)),
    "rope forward": ("qk_norm_half_rope_forward", lambda d: (d["qkv"], d["qw"], d["kw"], d["freqs"], 4, 2, 1e-6)),
    "rope backward": ("qk_norm_half_rope_backward", lambda d: (d["gq"], d["gk"], d["gv"], d["qkv"], d["qw"], d["kw"],
                                                               d["freqs"], 4, 2, 1e-6)),
    "gate forward": ("group_norm_gate_forward", lambda d: (d["xg"], d["gate"], d["wg"], 1e-6, 4)),
    "gate backward": ("group_norm_gate_backward", lambda d: (d["ggrad"], d["xg"], d["gate"], d["wg"], 1e-6, 4)),
    "gemm forward": ("fp32_gemm_forward", lambda d: (d["xi"], d["wi"], None)),
    "gemm backward": ("fp32_gemm_backward", lambda d: (d["go"], d["xi"], d["wi"], True, True, True, None, None)),
    "gemm backward dw fp32": ("fp32_gemm_backward",
                              lambda d: (d["go"], d["xi"], d["wi"], False, True, True, F32, None)),
    "cross entropy forward": ("softmax_cross_entropy_forward", lambda d: (d["logits"], d["labels"])),
    "cross entropy backward": ("softmax_cross_entropy_backward", lambda d: (
        d["logits"], d["labels"], torch.ops.linghe.softmax_cross_entropy_forward(d["logits"], d["labels"])[1],
        d["lgrad"])),
    "sum ord 1": ("batch_sum_with_ord", lambda d: (d["lists"], 1)),
    "sum ord 2": ("batch_sum_with_ord", lambda d: (d["lists"], 2)),
    "count zero": ("batch_count_zero", lambda d: (d["lists"],)),
}


def test_opcheck_covers_every_operator():
    assert {name for name, _ in OPCHECK_CASES.values()} == set(OP_NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("label", list(OPCHECK_CASES))
def test_opcheck(label):
    from linghe import library

    name, args = OPCHECK_CASES[label]
    torch.library.opcheck(library.OPS[name], args(_gpu_inputs()))


# ---- GPU: compiled (inductor, fullgraph) vs eager ---------------------------------------------------
_same = assert_same  # bit for bit: shapes, dtypes, devices, values


def _compile_cases(d):
    """label -> (fn, input names, outputs not written (compared by shape only), expected ops)."""
    from linghe.utils import fp32_gemm, gather, loss, norm, norm_gate, reduce, rope, scatter, silu

    nf, sf = norm.triton_rms_norm_and_block_quant_forward, silu.triton_silu_and_block_quant_forward
    bf = silu.triton_batch_weighted_silu_and_block_quant_forward
    ce_f, ce_b = loss.softmax_cross_entropy_forward, loss.softmax_cross_entropy_backward
    ce_ops = {"softmax_cross_entropy_forward", "softmax_cross_entropy_backward"}
    return {
        "norm mode 0": (lambda x, w: nf(x, w, round_scale=True, output_mode=0), ("x", "w"), (3, 4),
                        {"rms_norm_block_quant"}),
        "norm mode 1": (lambda x, w, r: nf(x, w, rms=r, output_mode=1), ("x", "w", "rms"), (),
                        {"rms_norm_block_quant"}),
        "norm buffers": (lambda x, w, o, s, r: nf(x, w, 1e-6, o, s, r, True, 2) + (o, s, r),
                         ("x", "w", "nout_buf", "nscale_buf", "nrms_buf"), (), {"rms_norm_block_quant"}),
        "silu mode 2": (lambda x: sf(x, round_scale=True), ("xs",), (), {"silu_block_quant_forward"}),
        "silu mode 1 buffer": (lambda x, o: sf(x, o, None, True, 1), ("xs", "sout_buf"), (1,),
                               {"silu_block_quant_forward"}),
        "silu backward": (lambda g, x: silu.triton_silu_and_block_quant_backward(g, x, True), ("gs", "xs"), (),
                          {"silu_block_quant_backward"}),
        "batch silu": (lambda x, w, c: bf(x, w, c, SPLITS, round_scale=True), ("xb", "wb", "counts"), (),
                       {"batch_silu_block_quant_forward"}),
        "batch silu backward": (
            lambda g, x, w, c: silu.triton_batch_weighted_silu_and_block_quant_backward(g, x, w, c, SPLITS),
            ("gb", "xb", "wb", "counts"), (), {"batch_silu_block_quant_backward"}),
        "permute": (lambda i, s, p, m: gather.triton_permute_with_mask_map(i, s, p, m, d["nout"]),
                    ("inp", "scale", "probs", "rid"), (), {"permute_with_mask_map"}),
        "permute padded": (lambda i, p, m, t: gather.triton_permute_with_mask_map(i, None, p, m, d["nout16"], False, t),
                           ("inp", "probs", "rid16", "tpe"), (), {"permute_with_mask_map"}),
        "unpermute": (lambda g, m, p: scatter.triton_unpermute_with_mask_map(g, m, p), ("grad", "rid", "pgrad"), (),
                      {"unpermute_with_mask_map"}),
        "rope": (lambda qkv, qw, kw, f, gq, gk, gv: rope.qk_norm_half_rope_forward(qkv, qw, kw, f, 4, 2)
                 + rope.qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, f, 4, 2),
                 ("qkv", "qw", "kw", "freqs", "gq", "gk", "gv"), (),
                 {"qk_norm_half_rope_forward", "qk_norm_half_rope_backward"}),
        "gate": (lambda gr, x, g, w: (norm_gate.group_norm_gate_forward(x, g, w, 1e-6, 4),)
                 + norm_gate.group_norm_gate_backward(gr, x, g, w, 1e-6, 4),
                 ("ggrad", "xg", "gate", "wg"), (), {"group_norm_gate_forward", "group_norm_gate_backward"}),
        "gemm": (lambda g, x, w: (fp32_gemm.fp32_gemm_forward(x, w),) + fp32_gemm.fp32_gemm_backward(g, x, w),
                 ("go", "xi", "wi"), (), {"fp32_gemm_forward", "fp32_gemm_backward"}),
        "cross entropy": (lambda x, y, g: ce_f(x, y) + (ce_b(x, y, ce_f(x, y)[1], g),), ("logits", "labels", "lgrad"),
                          (), ce_ops),
        "cross entropy inplace": (lambda x, y, g: (ce_b(x, y, ce_f(x, y)[1], g, True), x),
                                  ("logits", "labels", "lgrad"), (), ce_ops),
        "reductions": (lambda a, b, c: (reduce.triton_batch_sum_with_ord([a, b, c], 2),
                                        reduce.triton_batch_sum_with_ord([a, c], 1),
                                        reduce.triton_batch_count_zero([a, b, c])),
                       ("l0", "l1", "l2"), (), {"batch_sum_with_ord", "batch_count_zero"}),
    }


COMPILE_CASES = ("norm mode 0", "norm mode 1", "norm buffers", "silu mode 2", "silu mode 1 buffer", "silu backward",
                 "batch silu", "batch silu backward", "permute", "permute padded", "unpermute", "rope", "gate", "gemm",
                 "cross entropy", "cross entropy inplace", "reductions")


def _gpu_inputs_with_buffers():
    d = _gpu_inputs()
    d.update(nout_buf=torch.empty(300, 1024, dtype=FP8, device="cuda"),
             nscale_buf=torch.empty(300, 8, device="cuda"), nrms_buf=torch.empty(300, device="cuda"),
             sout_buf=torch.randn(257, 512, device="cuda").to(FP8),
             l0=d["lists"][0], l1=d["lists"][1], l2=d["lists"][2])
    return d


@pytest.mark.gpu
@pytest.mark.parametrize("label", COMPILE_CASES)
def test_compiled_function_matches_eager(label):
    """The documented functions compiled (inductor, fullgraph) give bitwise the eager results, caller
    buffers included; outputs documented as allocated but not written are compared by shape."""
    d = _gpu_inputs_with_buffers()
    fn, names, unwritten, ops = _compile_cases(d)[label]
    compiled, graphs = compile_recording(fn, "inductor")
    got = list(compiled(*[d[n].clone() for n in names]))
    want = list(fn(*[d[n].clone() for n in names]))
    assert graphs == [ops]
    for i in unwritten:
        assert _structure(got[i]) == _structure(want[i])
        got[i] = want[i] = None
    _same(got, want)


def _function_cases():
    """label -> (fn(*differentiable, *others), differentiable input names, other names, grad_output names, ops)."""
    from linghe.facade.fp32_linear import FusedFp32GEMM
    from linghe.facade.loss import SoftmaxCrossEntropyFunction
    from linghe.facade.norm import GroupNormGateFunction
    from linghe.facade.rope import QkNormHalfRopeFunction

    return {
        "QkNormHalfRopeFunction": (lambda qkv, qw, kw, f: QkNormHalfRopeFunction.apply(qkv, qw, kw, f, 4, 2, 1e-6),
                                   ("qkv", "qw", "kw"), ("freqs",), ("gq", "gk", "gv"),
                                   {"qk_norm_half_rope_forward", "qk_norm_half_rope_backward"}),
        "GroupNormGateFunction": (lambda x, g, w: GroupNormGateFunction.apply(x, g, w, 1e-6, 4),
                                  ("xg", "gate", "wg"), (), ("ggrad",),
                                  {"group_norm_gate_forward", "group_norm_gate_backward"}),
        "FusedFp32GEMM": (lambda x, w: FusedFp32GEMM.apply(x, w), ("xi", "wi"), (), ("go",),
                          {"fp32_gemm_forward", "fp32_gemm_backward"}),
        "SoftmaxCrossEntropyFunction": (lambda x, y: SoftmaxCrossEntropyFunction.apply(x, y, False),
                                        ("logits",), ("labels",), ("lgrad",),
                                        {"softmax_cross_entropy_forward", "softmax_cross_entropy_backward"}),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("label", ["QkNormHalfRopeFunction", "GroupNormGateFunction", "FusedFp32GEMM",
                                   "SoftmaxCrossEntropyFunction"])
def test_compiled_autograd_function_matches_eager(label):
    """A small module step (forward, then backward with random grad_outputs) compiled with fullgraph:
    outputs and gradients bitwise equal to eager, the forward and backward operators in the graph."""
    d = _gpu_inputs()
    fn, diff, others, grads, ops = _function_cases()[label]

    def step(f):
        leaves = [d[n].clone().requires_grad_() for n in diff]
        outs = f(*leaves, *[d[n] for n in others])
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [d[n] for n in grads])
        return [o.detach() for o in outs] + [t.grad for t in leaves]

    compiled, graphs = compile_recording(fn, "inductor")
    got, want = step(compiled), step(fn)
    assert graphs == [ops]
    _same(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("label", ["QkNormHalfRopeFunction", "GroupNormGateFunction", "FusedFp32GEMM",
                                   "SoftmaxCrossEntropyFunction"])
def test_reduce_overhead_compile_replays_graphs_like_eager(label):
    """torch.compile(mode="reduce-overhead"): inductor records the forward and backward graphs (with
    linghe's launches, PDL ones included) into CUDA graphs and replays them; three steps on new
    values each give eager's outputs and gradients bit for bit."""
    fn, diff, others, grads, _ = _function_cases()[label]
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)

    def step(f, d):
        leaves = [d[n].clone().requires_grad_() for n in diff]
        outs = f(*leaves, *[d[n] for n in others])
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [d[n] for n in grads])
        return [o.detach().clone() for o in outs] + [t.grad.clone() for t in leaves]

    base = _gpu_inputs()
    for k in range(3):  # the first runs warm up and record; the later ones replay on new values
        d = {n: (t * (1 + 0.25 * k) if t.is_floating_point() else t) if isinstance(t, torch.Tensor) else t
             for n, t in base.items()}
        _same(step(compiled, d), step(fn, d), f"step {k}")
