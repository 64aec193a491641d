"""Every documented op captured in a CUDA graph after one eager call, replayed on new input values,
and compared bitwise with an eager call on those values (GPU only). The autograd Functions are also
captured whole, forward and backward in one graph (PyTorch's whole-network pattern)."""
import pytest
import torch

from helpers import assert_same
from linghe.reference import make_row_id_map

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


_same = assert_same  # bit for bit: shapes, dtypes, devices, values


def graph_matches_eager(make, fn):
    """make(seed) -> tuple of input tensors (fresh random values); fn(*inputs) -> outputs."""
    static = [t.clone() for t in make(1)]
    fn(*static)  # compile and load outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*static)
    fresh = make(2)
    for s, t in zip(static, fresh):
        s.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    _same(captured, fn(*fresh))


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def test_rms_norm_quant():
    from linghe.utils.norm import triton_rms_norm_and_block_quant_forward as f

    w = torch.randn(1024, device="cuda", dtype=BF16)
    graph_matches_eager(lambda s: (torch.randn(300, 1024, device="cuda", generator=_gen(s)).to(BF16),),
                        lambda x: f(x, w, round_scale=True, output_mode=2))


def test_silu_plain_and_batched():
    from linghe.utils import silu

    graph_matches_eager(lambda s: (torch.randn(257, 1024, device="cuda", generator=_gen(s)).to(BF16),),
                        lambda x: silu.triton_silu_and_block_quant_forward(x, round_scale=True))
    graph_matches_eager(lambda s: (torch.randn(257, 512, device="cuda", generator=_gen(s)).to(BF16),
                                   torch.randn(257, 1024, device="cuda", generator=_gen(s + 9)).to(BF16)),
                        lambda g, x: silu.triton_silu_and_block_quant_backward(g, x))
    splits = [100, 0, 37, 120]
    counts = torch.tensor(splits, device="cuda")
    rows = sum(splits)
    graph_matches_eager(
        lambda s: (torch.randn(rows, 512, device="cuda", generator=_gen(s)).to(BF16),
                   torch.rand(rows, 1, device="cuda", generator=_gen(s + 3))),
        lambda x, w: silu.triton_batch_weighted_silu_and_block_quant_forward(x, w, counts, splits, round_scale=True))
    graph_matches_eager(
        lambda s: (torch.randn(rows, 256, device="cuda", generator=_gen(s)).to(BF16),
                   torch.randn(rows, 512, device="cuda", generator=_gen(s + 1)).to(BF16),
                   torch.rand(rows, 1, device="cuda", generator=_gen(s + 2))),
        lambda g, x, w: silu.triton_batch_weighted_silu_and_block_quant_backward(g, x, w, counts, splits))


def test_permute_and_unpermute():
    from linghe.utils.gather import triton_permute_with_mask_map
    from linghe.utils.scatter import triton_unpermute_with_mask_map

    tokens, experts, hidden = 300, 16, 512
    logits = torch.randn(tokens, experts, device="cuda", generator=_gen(5))
    routing = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(4, dim=1).indices, True)
    for multiple, contiguous in ((1, True), (16, False)):
        row_id_map, num_out = make_row_id_map(routing, multiple)
        per_expert = routing.sum(0).to(torch.int32)
        graph_matches_eager(
            lambda s: (torch.randn(tokens, hidden, device="cuda", generator=_gen(s)).to(BF16),
                       torch.rand(tokens, device="cuda", generator=_gen(s + 1)),
                       torch.rand(tokens, experts, device="cuda", generator=_gen(s + 2))),
            lambda x, sc, p: triton_permute_with_mask_map(x, sc, p, row_id_map, num_out, contiguous,
                                                          None if contiguous else per_expert))
        graph_matches_eager(
            lambda s: (torch.randn(num_out, hidden, device="cuda", generator=_gen(s)).to(BF16),
                       torch.rand(num_out, device="cuda", generator=_gen(s + 1))),
            lambda g, p: triton_unpermute_with_mask_map(g, row_id_map, p))


def test_qk_norm_half_rope_forward_and_backward():
    from linghe.utils.rope import qk_norm_half_rope_backward, qk_norm_half_rope_forward

    S, B, H, h, D = 64, 2, 8, 2, 128
    qw = torch.randn(D, device="cuda", dtype=BF16)
    kw = torch.randn(D, device="cuda", dtype=BF16)
    freqs = torch.rand(S, D // 2, device="cuda") * 3
    make_qkv = lambda s: torch.randn(S, B, (H + 2 * h) * D, device="cuda", generator=_gen(s)).to(BF16)  # noqa: E731
    graph_matches_eager(lambda s: (make_qkv(s),), lambda qkv: qk_norm_half_rope_forward(qkv, qw, kw, freqs, H, h))
    graph_matches_eager(
        lambda s: (torch.randn(B, S, H, D, device="cuda", generator=_gen(s)).to(BF16),
                   torch.randn(B, S, h, D, device="cuda", generator=_gen(s + 1)).to(BF16),
                   torch.randn(B, S, h, D, device="cuda", generator=_gen(s + 2)).to(BF16), make_qkv(s + 3)),
        lambda gq, gk, gv, qkv: qk_norm_half_rope_backward(gq, gk, gv, qkv, qw, kw, freqs, H, h))


def test_group_norm_gate_forward_and_backward():
    from linghe.utils.norm_gate import group_norm_gate_backward, group_norm_gate_forward

    B, S, dim = 2, 60, 1024
    w = torch.randn(dim, device="cuda", dtype=BF16)
    graph_matches_eager(
        lambda s: (torch.randn(B, S, dim, device="cuda", generator=_gen(s)).to(BF16),
                   torch.randn(S, B, dim, device="cuda", generator=_gen(s + 1)).to(BF16)),
        lambda x, g: group_norm_gate_forward(x, g, w, 1e-6, 4))
    graph_matches_eager(
        lambda s: (torch.randn(S, B, dim, device="cuda", generator=_gen(s)).to(BF16),
                   torch.randn(B, S, dim, device="cuda", generator=_gen(s + 1)).to(BF16),
                   torch.randn(S, B, dim, device="cuda", generator=_gen(s + 2)).to(BF16)),
        lambda grad, x, g: group_norm_gate_backward(grad, x, g, w, 1e-6, 4))


def test_fp32_gemm_forward_and_backward():
    from linghe.facade.fp32_linear import fp32_gemm_backward, fp32_gemm_forward

    w = torch.randn(64, 512, device="cuda", dtype=BF16)
    graph_matches_eager(lambda s: (torch.randn(2, 100, 512, device="cuda", generator=_gen(s)).to(BF16),),
                        lambda x: fp32_gemm_forward(x, w))
    graph_matches_eager(
        lambda s: (torch.randn(2, 100, 64, device="cuda", generator=_gen(s)),
                   torch.randn(2, 100, 512, device="cuda", generator=_gen(s + 1)).to(BF16)),
        lambda g, x: fp32_gemm_backward(g, x, w))


def test_cross_entropy_forward_and_backward():
    from linghe.utils.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward

    M, V = 100, 5003
    labels = torch.randint(-1, V, (M,), device="cuda", generator=_gen(7))
    graph_matches_eager(lambda s: (torch.randn(M, V, device="cuda", generator=_gen(s)).to(BF16),),
                        lambda x: softmax_cross_entropy_forward(x, labels))
    graph_matches_eager(
        lambda s: (torch.randn(M, V, device="cuda", generator=_gen(s)).to(BF16),
                   torch.rand(M, device="cuda", generator=_gen(s + 1))),
        lambda x, g: softmax_cross_entropy_backward(x, labels, softmax_cross_entropy_forward(x, labels)[1], g))


def test_batch_reductions():
    from linghe.utils.reduce import triton_batch_count_zero, triton_batch_sum_with_ord

    def make(s):
        g = _gen(s)
        return (torch.randn(1000, device="cuda", generator=g), torch.randn(33, 65, device="cuda", generator=g).to(BF16),
                torch.randn(0, device="cuda"), torch.randn(4097, device="cuda", generator=g).relu())

    graph_matches_eager(make, lambda *xs: triton_batch_sum_with_ord(list(xs), 2))
    graph_matches_eager(make, lambda *xs: triton_batch_sum_with_ord(list(xs), 1))
    graph_matches_eager(make, lambda *xs: triton_batch_count_zero(list(xs)))


# ---- the autograd Functions: forward and backward captured in one graph ------------------------------
def _leaves(*tensors):
    """Leaves that share the given tensors' storage: a graph's static inputs stay plain tensors."""
    return [t.detach().requires_grad_() for t in tensors]


def step_graph_matches_eager(make, step):
    """PyTorch's whole-network capture: warm up on a side stream (compiles and loads every kernel of both
    directions), capture ``step`` (forward and ``torch.autograd.grad``) in one graph, then twice copy new
    values into the static inputs and grad_outputs, replay, and compare bitwise with an eager step on them.

    make(seed) -> tuple of tensors (inputs and grad_outputs, fresh random values); step(*tensors) -> outputs.
    """
    static = [t.clone() for t in make(1)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    for seed in (2, 3):
        fresh = make(seed)
        for s, t in zip(static, fresh):
            s.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        _same(captured, step(*fresh), f"seed {seed}")


def _randn_bf16(g):
    return lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(BF16)


def test_qk_norm_half_rope_function_both_directions():
    from linghe.facade.rope import QkNormHalfRopeFunction

    S, B, H, h, D = 64, 2, 8, 2, 128

    def make(s):
        g = _gen(s)
        r = _randn_bf16(g)
        return (r(S, B, (H + 2 * h) * D), r(D), r(D), torch.rand(S, D // 2, device="cuda", generator=g) * 3,
                r(B, S, H, D), r(B, S, h, D), r(B, S, h, D))

    def step(qkv, qw, kw, freqs, gq, gk, gv):
        qkv, qw, kw = _leaves(qkv, qw, kw)
        q, k, v = QkNormHalfRopeFunction.apply(qkv, qw, kw, freqs, H, h, 1e-6)
        return (q, k, v, *torch.autograd.grad((q, k, v), (qkv, qw, kw), (gq, gk, gv)))

    step_graph_matches_eager(make, step)


def test_group_norm_gate_function_both_directions():
    from linghe.facade.norm import GroupNormGateFunction

    B, S, dim = 2, 60, 1024

    def make(s):
        r = _randn_bf16(_gen(s))
        return r(B, S, dim), r(S, B, dim), r(dim), r(S, B, dim)

    def step(x, gate, w, grad):
        x, gate, w = _leaves(x, gate, w)
        out = GroupNormGateFunction.apply(x, gate, w, 1e-6, 4)
        return (out, *torch.autograd.grad(out, (x, gate, w), grad))

    step_graph_matches_eager(make, step)


def test_fused_fp32_gemm_function_both_directions():
    from linghe.facade.fp32_linear import FusedFp32GEMM

    def make(s):
        g = _gen(s)
        r = _randn_bf16(g)
        # 2048 tokens: d_weight takes the split-K path (fp32 partials, then the fixed-order reduction)
        return r(2, 1024, 512), r(64, 512), torch.randn(2, 1024, 64, device="cuda", generator=g)

    def step(x, w, grad):
        x, w = _leaves(x, w)
        logits = FusedFp32GEMM.apply(x, w)
        return (logits, *torch.autograd.grad(logits, (x, w), grad))

    def step_input_only(x, w, grad):  # a frozen weight: only d_input is computed
        (x,) = _leaves(x)
        logits = FusedFp32GEMM.apply(x, w)
        return (logits, *torch.autograd.grad(logits, (x,), grad))

    step_graph_matches_eager(make, step)
    step_graph_matches_eager(make, step_input_only)


@pytest.mark.parametrize("inplace", [False, True])
def test_softmax_cross_entropy_function_both_directions(inplace):
    from linghe.facade.loss import SoftmaxCrossEntropyFunction

    B, S, V = 4, 25, 5003

    def make(s):
        g = _gen(s)
        return (torch.randn(B, S, V, device="cuda", generator=g).to(BF16),
                torch.randint(-1, V, (B, S), device="cuda", generator=g),
                torch.rand(B, S, device="cuda", generator=g))

    def step(logits, labels, grad):
        # inplace=True: the gradient overwrites the (static) logits and aliases them; each replay's
        # fresh logits are copied in first
        (x,) = _leaves(logits)
        loss = SoftmaxCrossEntropyFunction.apply(x, labels, inplace)
        return (loss, *torch.autograd.grad(loss, (x,), grad))

    step_graph_matches_eager(make, step)
