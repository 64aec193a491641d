"""Vocabulary-parallel softmax cross entropy (SoftmaxCrossEntropyFunction's tp_group).

CPU: validation, and the host-side combine (linghe.utils.loss_tp) over 2 gloo ranks against the
unsharded reference. GPU: the shard kernels (vocabulary offset) on one device, combined by hand,
against the unsharded op and linghe.reference; the whole Function over NCCL with 1 rank and
(with 2 GPUs) 2 ranks.
"""
from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import rel
from linghe.facade.loss import SoftmaxCrossEntropyFunction as CE
from linghe.reference.loss import ref_cross_entropy, ref_cross_entropy_grad, ref_shard_grad, ref_shard_stats
from linghe.utils import loss as L
from linghe.utils import loss_tp as T

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
GRAD_TOL = {BF16: 4e-3, F16: 1e-3, F32: 2e-5}


# ---- shared helpers (also used by the spawned ranks) -------------------------------------------
def _full(M, V, dtype, seed, device, scale=1.0, label_dtype=torch.int64):
    """Unsharded logits [M, V] and labels [M], the same on every rank (a CPU generator): labels
    among each row's top logits and anywhere, ignored (-100, -1) and out of range (V, V + 12345);
    a row far below -88 and a row whose maximum sits in the first quarter of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, V, generator=gen) * scale
    top = x.topk(min(8, V), dim=-1).indices
    y = top.gather(1, torch.randint(0, top.shape[1], (M, 1), generator=gen))[:, 0]
    y[::4] = torch.randint(0, V, (y[::4].numel(),), generator=gen)
    if M >= 8:
        y[0], y[1], y[2], y[3] = -100, V, -1, V + 12345
        x[5] -= 200.0
        x[6, : max(1, V // 4)] += 30.0
    return x.to(dtype).to(device), y.to(label_dtype).to(device)


def _assert_loss(loss, ref, what=""):
    assert loss.dtype == torch.float32 and loss.shape == ref.shape, what
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-4, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
    assert torch.equal(loss.isnan().cpu(), ref.isnan().cpu()), f"{what}: NaN rows differ"


def _assert_grad(grad, ref, labels, v_total, tol, what=""):
    """grad and ref: one shard's gradient (any shape with the shard width last)."""
    assert grad.shape == ref.shape, what
    V = grad.shape[-1]
    got, ref = grad.reshape(-1, V).double().cpu(), ref.reshape(-1, V).double().cpu()
    lab = labels.reshape(-1).long().cpu()
    bad, ignored = lab >= v_total, lab < 0
    assert torch.isnan(got[bad]).all(), f"{what}: label >= V rows must be NaN on every shard"
    assert (got[ignored] == 0).all(), f"{what}: ignored rows must be zero"
    ok = ~bad
    assert torch.isfinite(got[ok]).all(), f"{what}: non-finite gradient entries"
    r = rel(got[ok], ref[ok])
    assert r <= tol, f"{what}: rel {r:.3g} > {tol}"


def _spawn(worker, world, tmp_path):
    # A file store: no port to pick. A failing rank makes spawn stop the others and raise its traceback.
    mp.spawn(worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


# ---- CPU: validation ---------------------------------------------------------------------------
def test_validation_tp_group():
    x, y = torch.randn(6, 10).to(BF16), torch.randint(0, 10, (6,))
    for bad in ("group", 3, object(), dist.GroupMember.NON_GROUP_MEMBER):
        with pytest.raises(TypeError, match="tp_group"):
            CE.apply(x, y, False, bad)
    with pytest.raises(ValueError, match="logits"):
        CE.apply(x[0], y, False, "group")  # shapes are checked first
    with pytest.raises(TypeError, match="inplace"):
        CE.apply(x, y, -100, "group")
    with pytest.raises(ValueError, match="CUDA"):
        CE.apply(x, y, False, None)  # None: the unsharded op


def test_reference_shards_match_unsharded():
    """The shard references put back together give the unsharded reference."""
    M, Vl, n = 24, 13, 3
    x, y = _full(M, Vl * n, F32, seed=1, device="cpu", scale=3.0)
    g = torch.randn(M, generator=torch.Generator().manual_seed(2))
    parts = [ref_shard_stats(x[:, r * Vl:(r + 1) * Vl], y, r * Vl) for r in range(n)]
    parts = [(s.float(), p.float()) for s, p in parts]  # as the shard kernel returns them
    gmax = torch.stack([s[:, 0] for s, _ in parts]).amax(0)
    summed = sum(T.rescale(s, gmax, p) for s, p in parts)
    loss, stats = T.finish(gmax, summed, y, Vl * n)
    _assert_loss(loss, ref_cross_entropy(x, y))
    grads = torch.cat([ref_shard_grad(x[:, r * Vl:(r + 1) * Vl], y, stats, g, r * Vl, Vl * n) for r in range(n)], 1)
    torch.testing.assert_close(grads, ref_cross_entropy_grad(x, y, g), rtol=1e-5, atol=1e-7, equal_nan=True)


# ---- CPU: the combine over 2 gloo ranks ---------------------------------------------------------
def _run_rank(backend, checks, timeout, rank, world, store):
    """One spawned rank: join the file-store group, run `checks(rank, world, group)`, leave."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world, timeout=timeout)
    try:
        checks(rank, world, dist.new_group(list(range(world))))
    finally:
        dist.destroy_process_group()


def _gloo_worker(rank, world, store):
    _run_rank("gloo", _gloo_checks, timedelta(seconds=60), rank, world, store)


def _gloo_checks(rank, world, group):
    M, Vl = 37, 50
    V = world * Vl
    cols = slice(rank * Vl, (rank + 1) * Vl)
    x, y = _full(M, V, F32, seed=5, device="cpu", scale=2.0)
    x[9, Vl:] = float("-inf")  # every shard but the first is all -inf in this row
    y[9] = 3
    assert T.shard_range(group, Vl) == (rank * Vl, V)

    T.check_same_vocab(group, Vl, "cpu")
    assert Vl in T._CHECKED[group]
    with pytest.raises(ValueError, match="same number of vocabulary columns"):
        T.check_same_vocab(group, 10 + rank, "cpu")  # both ranks see the mismatch

    stats, picked = ref_shard_stats(x[:, cols], y, rank * Vl)
    stats, picked = stats.float(), picked.float()  # as the shard kernel returns them
    loss, gstats = T.combine(stats, picked, y, V, group)
    _assert_loss(loss, ref_cross_entropy(x, y), f"rank {rank}")
    assert loss[0] == 0 and loss[2] == 0 and loss[1].isnan() and loss[3].isnan()
    xd = x.double()
    row_max = xd.max(-1).values
    assert torch.equal(gstats[:, 0].double(), row_max)
    torch.testing.assert_close(gstats[:, 1].double(), (xd - row_max[:, None]).exp().sum(-1), rtol=1e-6, atol=0)
    # the combined stats turn each shard into its slice of the unsharded gradient
    g = torch.randn(M, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ref_shard_grad(x[:, cols], y, gstats, g, rank * Vl, V),
                               ref_cross_entropy_grad(x, y, g)[:, cols], rtol=1e-5, atol=1e-7, equal_nan=True)

    loss3, _ = T.combine(stats[:36], picked[:36], y[:36], V, group, (4, 9))
    assert loss3.shape == (4, 9) and loss3._base is None  # not a view: autograd allows in-place use
    assert torch.equal(loss3.nan_to_num(7.0), loss[:36].view(4, 9).nan_to_num(7.0))
    empty, empty_stats = T.combine(stats[:0], picked[:0], y[:0], V, group, (2, 0))  # no exchange
    assert empty.shape == (2, 0) and empty_stats.shape == (0, 2)

    with pytest.raises(ValueError, match="CUDA"):  # a valid group passes; the device check speaks
        CE.apply(x[:, cols].to(BF16), y, False, group)


def test_combine_two_ranks_gloo(tmp_path):
    _spawn(_gloo_worker, 2, tmp_path)


# ---- GPU, one device: the shard kernels, combined by hand ---------------------------------------
SHARDED = [  # (M, V_local, shards, dtype, scale)
    (64, 40001, 4, BF16, 1.0),   # odd width: the shards' rows start at every alignment
    (128, 78592, 2, BF16, 10.0),
    (33, 1000, 3, F32, 3.0),
    (40, 999, 2, F16, 1.0),
    (17, 7, 3, BF16, 1.0),       # shards narrower than one vector
]


@pytest.mark.gpu
@pytest.mark.parametrize("M,Vl,n,dtype,scale", SHARDED)
def test_shard_kernels_combine_to_unsharded(M, Vl, n, dtype, scale):
    V = Vl * n
    x, y = _full(M, V, dtype, seed=M, device="cuda", scale=scale)
    dev = x.device
    shards = [x[:, r * Vl:(r + 1) * Vl].contiguous() for r in range(n)]
    parts = [L.forward_shard_2d(s, y, r * Vl, dev) for r, s in enumerate(shards)]
    for r, (s, (st, picked)) in enumerate(zip(shards, parts)):
        ref_st, ref_picked = ref_shard_stats(s, y, r * Vl)
        assert st.shape == (M, 2) and picked.shape == (M,) and picked.dtype == torch.float32
        assert torch.equal(st[:, 0].double(), ref_st[:, 0]), f"shard {r}: max"
        torch.testing.assert_close(st[:, 1].double(), ref_st[:, 1], rtol=1e-5, atol=0)
        assert torch.equal(picked.double(), ref_picked), f"shard {r}: label logit"

    gmax = torch.stack([st[:, 0] for st, _ in parts]).amax(0)
    summed = sum(T.rescale(st, gmax, picked) for st, picked in parts)
    loss, gstats = T.finish(gmax, summed, y, V)
    _assert_loss(loss, ref_cross_entropy(x, y), "combined")
    want_loss, want_stats = L.softmax_cross_entropy_forward(x, y)  # the unsharded op
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert torch.equal(gstats[:, 0], want_stats[:, 0])
    torch.testing.assert_close(gstats[:, 1], want_stats[:, 1], rtol=1e-5, atol=0)

    g = torch.randn(M, device=dev)
    want_grad = L.softmax_cross_entropy_backward(x, y, want_stats, g)
    ref_grad = ref_cross_entropy_grad(x, y, g)
    ok = ~(y >= V)
    bits = torch.int16 if x.element_size() == 2 else torch.int32
    for r, s in enumerate(shards):
        cols, what = slice(r * Vl, (r + 1) * Vl), f"shard {r} of {n}"
        grad = L.backward_2d(s, y, gstats, g, False, dev, r * Vl, V)
        _assert_grad(grad, ref_grad[:, cols], y, V, GRAD_TOL[dtype], what)
        _assert_grad(grad, ref_shard_grad(s, y, gstats, g, r * Vl, V), y, V, GRAD_TOL[dtype], what + " (shard ref)")
        assert rel(grad[ok], want_grad[:, cols][ok]) <= GRAD_TOL[dtype], what + " vs the unsharded op"
        # a label held by another shard must not zero the row here (rows whose softmax survives rounding)
        elsewhere = (y >= 0) & (y < V) & ((y < r * Vl) | (y >= (r + 1) * Vl))
        elsewhere &= (ref_grad[:, cols].to(dtype) != 0).any(-1)
        assert elsewhere.any() and (grad[elsewhere] != 0).any(-1).all(), what
        inplace = s.clone()
        assert L.backward_2d(inplace, y, gstats, g, True, dev, r * Vl, V) is inplace
        assert torch.equal(inplace.view(bits), grad.view(bits)), what + ": in place differs"


@pytest.mark.gpu
def test_shard_kernel_unsharded_is_plain_forward():
    """The whole vocabulary as one shard: the same stats as the plain forward, bitwise."""
    x, y = _full(50, 30011, BF16, seed=3, device="cuda")
    loss, stats = L.softmax_cross_entropy_forward(x, y)
    st, picked = L.forward_shard_2d(x, y, 0, x.device)
    assert torch.equal(st, stats)
    held = (y >= 0) & (y < 30011)
    assert torch.equal(picked[held], x[held, y[held]].float()) and (picked[~held] == 0).all()


# ---- GPU, NCCL: the whole Function over a process group -----------------------------------------
def _nccl_worker(rank, world, store):
    _run_rank("nccl", _nccl_checks, timedelta(minutes=3), rank, world, store)


def _nccl_checks(rank, world, group):
    dev = torch.device("cuda", rank)
    B, S, Vl = 3, 40, 30011  # odd width
    V = world * Vl
    cols = slice(rank * Vl, (rank + 1) * Vl)
    cases = itertools.product([False, True], [False, True], ["random", "sum"])
    for i, (three_d, inplace, reduce) in enumerate(cases):
        what = f"rank {rank}/{world} 3d={three_d} inplace={inplace} grad={reduce}"
        x, y = _full(B * S, V, BF16, seed=10 + i, device=dev, label_dtype=(torch.int32, torch.int64)[i % 2])
        if three_d:
            x, y = x.view(B, S, V), y.view(B, S)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(i)).to(dev)
        if reduce == "sum":
            g = torch.ones(y.shape, device=dev)

        def run(logits, *extra):
            loss = CE.apply(logits, y, *extra)
            (loss.sum() if reduce == "sum" else (loss * g).sum()).backward()  # .sum(): stride-0 grad_output
            return loss.detach()

        xf = x.clone().requires_grad_()
        want = run(xf)  # the unsharded op, on this rank
        x0 = x[..., cols].contiguous()
        xs = x0.clone().requires_grad_()
        loss = run(xs, inplace, group)
        _assert_loss(loss, ref_cross_entropy(x, y), what)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4, equal_nan=True)
        _assert_grad(xs.grad, ref_cross_entropy_grad(x, y, g)[..., cols], y, V, GRAD_TOL[BF16], what)
        ok = ~(y.reshape(-1) >= V)
        assert rel(xs.grad.reshape(-1, Vl)[ok], xf.grad[..., cols].reshape(-1, Vl)[ok]) <= GRAD_TOL[BF16], what
        if inplace:
            assert xs.grad.data_ptr() == xs.data_ptr(), what + ": gradient must live in the logits' storage"
        else:
            assert torch.equal(xs.detach(), x0), what + ": inplace=False must not modify the logits"

    empty = torch.empty(2, 0, Vl, dtype=BF16, device=dev, requires_grad=True)
    loss = CE.apply(empty, torch.empty(2, 0, dtype=torch.int64, device=dev), True, group)
    assert loss.shape == (2, 0)
    loss.sum().backward()
    assert empty.grad.shape == empty.shape
    if world > 1:  # uneven shards: every rank raises
        with pytest.raises(ValueError, match="same number of vocabulary columns"):
            CE.apply(torch.randn(4, 1000 + rank, device=dev), torch.zeros(4, dtype=torch.int64, device=dev), False,
                     group)


@pytest.mark.gpu
def test_tp_one_rank_nccl(tmp_path):
    _spawn(_nccl_worker, 1, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp_two_ranks_nccl(tmp_path):
    _spawn(_nccl_worker, 2, tmp_path)
