"""FusedFp32GEMM, the router GEMM (SPEC.md §4.3): compilation, tiling rules, validation, the kernels'
index math (emulated on the CPU), and on a GPU every function against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from helpers import preset_constants, rel
from linghe.cache import DiskCache
from linghe.utils import fp32_gemm as G
from linghe.facade.fp32_linear import FusedFp32GEMM, fp32_gemm_backward, fp32_gemm_forward
from linghe.reference.gemm import ref_fp32_gemm_backward, ref_fp32_gemm_forward, split_bf16

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


# ---- CPU: compilation ------------------------------------------------------------------------
def _prewarm_constants():
    return preset_constants(G._prewarm)


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_prewarm_specs_compile(tmp_path, arch):
    # On sm_80 the wgmma kernel builds as a stub (it is only launched on sm_90a).
    specs = _prewarm_constants()
    assert {k.op for k, _ in specs} == {"fp32_gemm_mma", "fp32_gemm_wgmma", "fp32_gemm_split", "fp32_gemm_reduce"}
    for kernel, constants in specs:
        entry, _ = kernel.build(kernel.spec(arch, **constants), DiskCache(tmp_path))
        assert entry.cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize("kernel, constants", [
    (G.GEMM_WGMMA, dict(G.tile_config("wgmma", "fwd", 13, 100), MMA="f16", OUT="f32", EVEN=False, STV=False)),
    (G.GEMM_WGMMA, dict(G.tile_config("wgmma", "dw", 8, 64, 2), MMA="bf16", OUT="f16", EVEN=True, STV=True)),
    (G.GEMM_WGMMA, dict(G.tile_config("wgmma", "dx", 4096, 2048, 2), MMA="bf16", OUT="bf16", EVEN=True,
                        STV=True)),  # promotes
    (G.GEMM_WGMMA, dict(G.tile_config("wgmma", "fwd", 256, 2048), MMA="bf16", OUT="f32", EVEN=True, STV=True)),
    (G.GEMM_MMA, dict(G.tile_config("mma", "dw", 16, 16), MMA="f16", OUT="f32", VEC=False, EVEN=False)),
    (G.GEMM_MMA, dict(G.tile_config("mma", "fwd", 13, 100), MMA="bf16", OUT="f32", VEC=False, EVEN=False)),
    (G.SPLIT, dict(IN="f32", PARTS=3, CONTIG=False)),
    (G.SPLIT, dict(IN="f16", PARTS=1, CONTIG=True)),
    (G.REDUCE, dict(OUT="f32")),
])
def test_other_specs_compile(tmp_path, kernel, constants):
    entry, _ = kernel.build(kernel.spec("sm_90a", **constants), DiskCache(tmp_path))
    assert entry.cubin[:4] == b"\x7fELF"


def test_wgmma_kernel_renders_the_warpgroup_mma():
    c = G.tile_config("wgmma", "dx", 256, 2048, 2)
    src = G.GEMM_WGMMA.render(G.GEMM_WGMMA.spec("sm_90a", **c, MMA="bf16", OUT="bf16", EVEN=True, STV=True))
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in src
    assert "p, 1, 1, 0, 1;" in src  # A K-major, B N-major (transposed)
    assert "constexpr bool PINGPONG = true" in src
    c = dict(G.tile_config("wgmma", "dw", 256, 2048, 2), CLUSTER=2)
    src = G.GEMM_WGMMA.render(G.GEMM_WGMMA.spec("sm_90a", **c, MMA="bf16", OUT="f32", EVEN=True, STV=False))
    assert "__cluster_dims__(2, 1, 1)" in src and "tma_load3_multicast(" in src


def test_precision_rules():
    """Accumulation chains stay short: the forward promotes every CHAIN_K; d_input promotes when
    n_experts is large; d_weight's split chunks hold at most DW_CHAIN products of k."""
    for impl, step in (("wgmma", 64), ("mma", 32)):
        fwd = G.tile_config(impl, "fwd", 256, 16384)
        assert fwd["PROMO"] * step == G.CHAIN_K
        assert G.tile_config(impl, "dx", 256, 2048, 2)["PROMO"] == 0  # 512 products of k: one chain
        assert G.tile_config(impl, "dx", 4096, 2048, 2)["PROMO"] * step * 2 == G.CHAIN_K
    for tokens in (100, 8192, 65536, 10 ** 6):
        for ap in (1, 2):
            splits, chunk = G._dw_splits("wgmma", 256, 2048, tokens, ap, 132)
            assert chunk * 64 * ap <= G.DW_CHAIN and splits * chunk * 64 >= tokens > (splits - 1) * chunk * 64


# ---- CPU: tiling rules -------------------------------------------------------------------------
@pytest.mark.parametrize("n_experts", [1, 8, 13, 64, 96, 128, 256, 512])
@pytest.mark.parametrize("dim", [1, 64, 100, 2048, 7168, 16384])
def test_tile_configs(n_experts, dim):
    for kind, ap in (("fwd", 1), ("dx", 2), ("dw", 2), ("dx", 1), ("dw", 1)):
        w = G.tile_config("wgmma", kind, n_experts, dim, ap)
        assert w["NWG"] in (1, 2) and w["BN"] in (16, 32, 64, 128, 256) and w["STAGES"] >= 2
        assert w["B_KMAJOR"] or w["BN"] % 64 == 0  # N-major B tiles are whole 64-wide swizzle atoms
        assert G.smem_bytes("wgmma", w) <= 227 * 1024 and w["NWG"] % w["CLUSTER"] == 0
        assert not (w["PROMO"] or w["PINGPONG"]) or w["BN"] <= 128  # two accumulator sets of 64 x BN
        assert not (w["PROMO"] and w["PINGPONG"])
        m = G.tile_config("mma", kind, n_experts, dim, ap)
        tm, tn = m["BM"] // m["WM"], m["BN"] // m["WN"]
        assert 16 <= tm <= 64 and 16 <= tn <= 64 and tm % 16 == 0 and tn % 16 == 0
        assert G.smem_bytes("mma", m) <= 99 * 1024  # fits every sm_8x part


def test_pass_selection():
    def op(n, exact):
        return G._Operand([None] * n, 8, exact, 1, 8, 8, "bf16")
    assert G._passes(op(1, True), op(1, True)) == ([(0, 0)], 0)
    assert G._passes(op(2, False), op(1, True))[0] == [(0, 0), (1, 0)]      # fp32 grad x bf16 weight
    assert G._passes(op(1, False), op(1, True))[0] == [(0, 0)]              # split=False
    assert G._passes(op(3, True), op(3, True))[0] == [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0)]
    pairs, code = G._passes(op(2, False), op(3, True))
    assert pairs == [(0, 0), (0, 1), (1, 0)] and code == (0 | 4 << 4 | 1 << 8)
    assert G._schedule(2, False, 1, True) == (2, 1, 0)   # hi and lo share each B tile: one pass, AP = 2
    assert G._schedule(3, True, 3, True) == (1, 6, G._pairs(3, True, 3, True)[1])


# ---- CPU: validation ---------------------------------------------------------------------------
def _cpu(m=6, e=8, k=32):
    return torch.randn(2, m, k, dtype=BF16), torch.randn(e, k, dtype=BF16)


@pytest.mark.parametrize("mutate, exc, word", [
    (lambda x, w: (x[0, 0], w), ValueError, "input"),                   # 1-D
    (lambda x, w: (x[None], w), ValueError, "input"),                   # 4-D
    (lambda x, w: (x.int(), w), TypeError, "input"),
    (lambda x, w: (x.double(), w), TypeError, "input"),
    (lambda x, w: ([1.0], w), TypeError, "input"),
    (lambda x, w: (x, w[:, :16]), ValueError, "weight"),               # dim mismatch
    (lambda x, w: (x, w[0]), ValueError, "weight"),
    (lambda x, w: (x, w.to(torch.float8_e4m3fn)), TypeError, "weight"),
    (lambda x, w: (x[..., :0], w[:, :0]), ValueError, "dim"),
    (lambda x, w: (x, w[:0]), ValueError, "n_experts"),
    (lambda x, w: (x, w), ValueError, "CUDA"),
])
def test_bad_input_is_named(mutate, exc, word):
    x, w = mutate(*_cpu())
    with pytest.raises(exc, match=word):
        fp32_gemm_forward(x, w)
    with pytest.raises(exc, match=word):
        FusedFp32GEMM.apply(x, w)


@pytest.mark.parametrize("mutate, exc, word", [
    (lambda g: g[..., :7], ValueError, "grad_output"),
    (lambda g: g[0], ValueError, "grad_output"),
    (lambda g: g.long(), TypeError, "grad_output"),
    (lambda g: g, ValueError, "CUDA"),
])
def test_bad_backward_input_is_named(mutate, exc, word):
    x, w = _cpu()
    g = mutate(torch.randn(2, 6, 8))
    with pytest.raises(exc, match=word):
        fp32_gemm_backward(g, x, w)


def test_bad_grad_dtype():
    x, w = _cpu()
    with pytest.raises(TypeError, match="grad_dtype"):
        fp32_gemm_backward(torch.randn(2, 6, 8), x, w, grad_dtype=torch.int32)


# ---- CPU: references -----------------------------------------------------------------------------
def test_reference_matches_independent_formulation():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 5, dtype=BF16), torch.randn(4, 5, dtype=BF16)
    y = ref_fp32_gemm_forward(x, w)
    for b, s, e in [(0, 0, 0), (1, 2, 3), (1, 0, 1)]:
        want = sum(float(x[b, s, k]) * float(w[e, k]) for k in range(5))
        assert abs(float(y[b, s, e]) - want) < 1e-12
    g = torch.randn(2, 3, 4, dtype=F32)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    torch.nn.functional.linear(xd, wd).backward(g.double())
    dx, dw = ref_fp32_gemm_backward(g, x, w)
    torch.testing.assert_close(dx, xd.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(dw, wd.grad, rtol=1e-12, atol=1e-14)


def test_split_parts_carry_the_value():
    torch.manual_seed(1)
    x = torch.randn(4096) * torch.exp2(torch.randint(-30, 30, (4096,)).float())
    hi, lo = split_bf16(x, 2)
    err = ((hi.double() + lo.double()) - x.double()).abs() / x.double().abs()
    assert err.max() <= 2.0 ** -16
    assert torch.equal(sum(p.double() for p in split_bf16(x, 3)), x.double())  # three parts: exact
    h = torch.randn(4096).half()
    assert torch.equal(sum(p.double() for p in split_bf16(h, 2)), h.double())  # fp16: two parts exact


# ---- CPU: emulation of the kernels' index math ----------------------------------------------------
# The formulas below are the kernels' (fp32_gemm.cu.j2, fp32_gemm_wgmma.cu.j2, fp32_gemm.cuh), applied
# to a byte-addressed model of shared memory; ldmatrix, mma.m16n8k16 fragments and the wgmma
# descriptor layouts follow the PTX ISA. A wrong address, fragment or mask shows as a wrong product.
def _load_tile(smem, addr, g, ld, r0, rlim, c0, clim, rows, cols, vec):
    for idx in range(rows * (cols // 8)):
        r, j = divmod(idx, cols // 8)
        gr, gc = r0 + r, c0 + j * 8
        dst = addr(r, j)
        assert dst % 16 == 0
        left = clim - gc if gr < rlim else 0
        nbytes = 0 if left <= 0 else min(16, left * 2)  # VEC: cp.async src-size; else per-element masks
        for q in range(8):
            ok = 2 * q < nbytes if vec else (gr < rlim and gc + q < clim)
            smem[dst + 2 * q] = g[gr * ld + gc + q] if ok else 0.0


def _ldmatrix(smem, lane_addr, trans):
    """regs[lane][j] = (low, high) elements of matrix j (rows addressed by lanes 8j..8j+7)."""
    regs = [[None] * 4 for _ in range(32)]
    for j in range(4):
        mat = [[smem[lane_addr[8 * j + r] + 2 * c] for c in range(8)] for r in range(8)]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            regs[lane][j] = (mat[2 * t][g], mat[2 * t + 1][g]) if trans else (mat[g][2 * t], mat[g][2 * t + 1])
    return regs


def _mma(acc, a, b):
    """acc (16x8 tensor) += A (16x16) B (16x8) from per-lane fragments, PTX m16n8k16 row.col layouts."""
    A, B = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[row, col], A[row, col + 1] = a[lane][reg]
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            B[k, g], B[k + 1, g] = b[lane][reg]
    acc += A @ B


def _emulate_mma(parts, code, npass, ap, M, N, K, lda, ldb, a_k, b_k, BM, BN, BK, WM, WN, STAGES, k_chunk, splits,
                 grid, vec):
    PAD, TM, TN = 8, BM // WM, BN // WN
    A_LD, B_LD = (BK if a_k else BM) + PAD, (BK if b_k else BN) + PAD
    A_BYTES, B_BYTES = (BM if a_k else BK) * A_LD * 2, (BN if b_k else BK) * B_LD * 2
    STAGE = ap * A_BYTES + B_BYTES
    n_tiles = -(-N // BN)
    tiles, kt_all = -(-M // BM) * n_tiles, -(-K // BK)
    out = {}
    for bx in range(grid):
        for bz in range(splits):
            kt_begin = bz * k_chunk
            nk = max(0, min(kt_all, kt_begin + k_chunk) - kt_begin)
            spt = nk * npass
            total = ((tiles - 1 - bx) // grid + 1 if bx < tiles else 0) * spt
            org = lambda local: (((bx + local * grid) // n_tiles) * BM, ((bx + local * grid) % n_tiles) * BN)
            smem = {}

            def load_stage(st, step):
                local, rem = divmod(step, spt)
                p, kk = divmod(rem, nk)
                k0, (m0, n0) = (kt_begin + kk) * BK, org(local)
                cd = (code >> (4 * p)) & 15
                b = parts[1][cd >> 2]
                sb = st * STAGE + ap * A_BYTES
                ba = lambda r, j: sb + (r * B_LD + j * 8) * 2
                for part in range(ap):
                    a = parts[0][cd & 3] if part == 0 else parts[0][1]
                    sa = st * STAGE + part * A_BYTES
                    aa = lambda r, j: sa + (r * A_LD + j * 8) * 2
                    if a_k:
                        _load_tile(smem, aa, a, lda, m0, M, k0, K, BM, BK, vec)
                    else:
                        _load_tile(smem, aa, a, lda, k0, K, m0, M, BK, BM, vec)
                if b_k:
                    _load_tile(smem, ba, b, ldb, n0, N, k0, K, BN, BK, vec)
                else:
                    _load_tile(smem, ba, b, ldb, k0, K, n0, N, BK, BN, vec)

            acc = {}
            for s in range(min(STAGES - 1, total)):
                load_stage(s, s)
            for it in range(total):
                if it + STAGES - 1 < total:
                    load_stage((it + STAGES - 1) % STAGES, it + STAGES - 1)
                sa0 = (it % STAGES) * STAGE
                sb = sa0 + ap * A_BYTES
                for w, part in [(w, part) for w in range(WM * WN) for part in range(ap)]:
                    wm, wn = w // WN, w % WN
                    sa = sa0 + part * A_BYTES
                    for kk in range(BK // 16):
                        af = []
                        for mi in range(TM // 16):
                            m = wm * TM + mi * 16
                            la = [sa + ((m + (ln & 15)) * A_LD + kk * 16 + (ln >> 4) * 8) * 2 if a_k else
                                  sa + ((kk * 16 + (ln & 7) + (ln >> 4) * 8) * A_LD + m + ((ln >> 3) & 1) * 8) * 2
                                  for ln in range(32)]
                            af.append(_ldmatrix(smem, la, not a_k))
                        bf = []
                        for npair in range(TN // 16):
                            n = wn * TN + npair * 16
                            lb = [sb + ((n + (ln >> 4) * 8 + (ln & 7)) * B_LD + kk * 16 + ((ln >> 3) & 1) * 8) * 2 if b_k
                                  else sb + ((kk * 16 + ((ln >> 3) & 1) * 8 + (ln & 7)) * B_LD + n + (ln >> 4) * 8) * 2
                                  for ln in range(32)]
                            r = _ldmatrix(smem, lb, not b_k)
                            bf += [[(r[ln][0], r[ln][1]) for ln in range(32)], [(r[ln][2], r[ln][3]) for ln in range(32)]]
                        for mi in range(TM // 16):
                            for ni in range(TN // 8):
                                key = (w, mi, ni)
                                acc.setdefault(key, torch.zeros(16, 8, dtype=torch.float64))
                                _mma(acc[key], af[mi], bf[ni])
                local = it // spt
                if it - local * spt == spt - 1:  # epilogue: fragment rows g / g+8, columns 2t, 2t+1
                    m0, n0 = org(local)
                    for (w, mi, ni), v in acc.items():
                        for i in range(16):
                            for j in range(8):
                                row, col = m0 + (w // WN) * TM + mi * 16 + i, n0 + (w % WN) * TN + ni * 8 + j
                                if row < M and col < N:
                                    assert (bz, row, col) not in out
                                    out[(bz, row, col)] = float(v[i, j])
                    acc = {}
    return out


def _sw128_k(r, j):
    return (r >> 3) * 1024 + (r & 7) * 128 + ((j ^ (r & 7)) << 4)


def _sw128_mn(mn):
    return lambda r, j: ((r >> 3) * (mn // 64) + (j >> 3)) * 1024 + (r & 7) * 128 + (((j & 7) ^ (r & 7)) << 4)


def _desc_read(smem, start, lbo, sbo, kmajor, extent):
    """A (extent x 16) operand through a 128B-swizzle descriptor, by the PTX canonical layouts (T = 8):
    K-major ((8,m),(T,2k)):((8T,SBO),(1,T)); MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)); Swizzle<3,4,3>."""
    out = torch.zeros(extent, 16, dtype=torch.float64)
    for mn in range(extent):
        for k in range(16):
            if kmajor:
                off = 2 * ((mn % 8) * 64 + k % 8 + (k // 8) * 8) + (mn // 8) * sbo
            else:
                off = 2 * (mn % 64 + (k % 8) * 64) + (mn // 64) * lbo + (k // 8) * sbo
            addr = start + off
            out[mn, k] = smem[addr ^ (((addr >> 7) & 7) << 4)]
    return out


def _tma_box(smem, dst, mem, ld, rows, cols, c0, c1, c2, box_rows, box_parts):
    """One TMA box (64 columns x box_rows rows x box_parts parts) of a [parts][rows][cols] tensor (row
    stride ld; zeros outside) to shared memory with the 128-byte swizzle: element (pp, r, c) at linear
    offset L = ((pp * box_rows + r) * 64 + c) * 2 from dst, 16-byte chunk bits 4-6 XOR bits 7-9."""
    assert dst % 1024 == 0
    for pp in range(box_parts):
        for r in range(box_rows):
            for c in range(64):
                part, row, col = c2 + pp, c1 + r, c0 + c
                ok = 0 <= part < len(mem) and 0 <= row < rows and 0 <= col < cols
                lin = ((pp * box_rows + r) * 64 + c) * 2
                smem[dst + (lin ^ (((lin >> 7) & 7) << 4))] = mem[part][row * ld + col] if ok else 0.0


def _emulate_wgmma(parts, code, npass, ap, M, N, K, lda, ldb, a_k, b_k, NWG, BN, STAGES, PROMO, CLUSTER, k_chunk,
                   splits, grid):
    """fp32_gemm_wgmma.cu.j2 step by step: the producer's TMA boxes (coordinates, destinations, multicast
    split), the consumers' descriptors, promotion chunks and the epilogue mapping."""
    BM, BOX = 64 * NWG, 8192
    A_BYTES, B_BYTES = NWG * ap * BOX, BN * 128
    STAGE = A_BYTES + B_BYTES
    A_LBO, A_KSTEP = (16, 32) if a_k else (BOX, 2048)
    B_LBO, B_KSTEP = (16, 32) if b_k else (BOX, 2048)
    a_rows, a_cols = (M, K) if a_k else (K, M)
    b_rows, b_cols = (N, K) if b_k else (K, N)
    n_tiles = -(-N // BN)
    n_groups = -(-n_tiles // CLUSTER)
    units, kt_all = -(-M // BM) * n_groups, -(-K // 64)
    assert grid % CLUSTER == 0 and NWG % CLUSTER == 0
    out = {}
    for bz in range(splits):
        for bx in range(grid):
            cid, ncl, rank = bx // CLUSTER, grid // CLUSTER, bx % CLUSTER
            my_units = (units - 1 - cid) // ncl + 1 if cid < units else 0
            kt_begin = bz * k_chunk
            nk = max(0, min(kt_all, kt_begin + k_chunk) - kt_begin)
            spt = nk * npass
            smem, stage = {}, 0
            for i in range(my_units):
                u = cid + i * ncl
                m0, n0 = u // n_groups * BM, ((u % n_groups) * CLUSTER + rank) * BN
                acc = [torch.zeros(64, BN, dtype=torch.float64) for _ in range(NWG)]
                accf = [torch.zeros(64, BN, dtype=torch.float64) for _ in range(NWG)]
                fresh = [True] * NWG
                st = 0
                for p in range(npass):
                    cd = (code >> (4 * p)) & 15
                    pa, pb = cd & 3, cd >> 2
                    for kk in range(nk):
                        k0 = (kt_begin + kk) * 64
                        sa = stage * STAGE
                        sb = sa + A_BYTES
                        # A box h is issued by rank h % CLUSTER and multicast: the same bytes in every CTA
                        assert sorted(h for r in range(CLUSTER) for h in range(NWG) if h % CLUSTER == r) == list(range(NWG))
                        for h in range(NWG):
                            c0, c1 = (k0, m0 + 64 * h) if a_k else (m0 + 64 * h, k0)
                            _tma_box(smem, sa + h * ap * BOX, parts[0], lda, a_rows, a_cols, c0, c1, pa, 64, ap)
                        if b_k:
                            _tma_box(smem, sb, parts[1], ldb, b_rows, b_cols, k0, n0, pb, BN, 1)
                        else:
                            for a in range(BN // 64):
                                _tma_box(smem, sb + a * BOX, parts[1], ldb, b_rows, b_cols, n0 + 64 * a, k0, pb, 64, 1)
                        for wg in range(NWG):
                            skew = wg * (PROMO // 2) if PROMO else 0
                            for s in range(4):
                                bmat = _desc_read(smem, sb + s * B_KSTEP, B_LBO, 1024, b_k, BN)
                                for pp in range(ap):
                                    amat = _desc_read(smem, sa + (wg * ap + pp) * BOX + s * A_KSTEP, A_LBO, 1024, a_k, 64)
                                    keep = 0.0 if (s == 0 and pp == 0 and fresh[wg]) else 1.0  # scale-d
                                    acc[wg] = keep * acc[wg] + amat @ bmat.t()
                            fresh[wg] = st == spt - 1 or bool(PROMO and (st + 1 + skew) % PROMO == 0)
                            if fresh[wg]:  # the chain ends: promote
                                accf[wg] += acc[wg]
                        st += 1
                        stage = (stage + 1) % STAGES
                for wg in range(NWG):  # epilogue: element (row 16 w + g (+8), column 8j + 2t (+1)) of warpgroup wg
                    for r in range(64):
                        for col_in in range(BN):
                            row, col = m0 + 64 * wg + r, n0 + col_in
                            if row < M and col < N:
                                assert (bz, row, col) not in out
                                out[(bz, row, col)] = float(accf[wg][r, col_in])
    return out


class _Bar:
    """An mbarrier: phases complete when all arrivals came and the transaction count is back to 0."""

    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0

    def _step(self):
        if self.pending == 0 and self.tx == 0:
            self.phase, self.pending = self.phase + 1, self.count

    def arrive(self, tx=0):
        assert self.pending > 0
        self.pending, self.tx = self.pending - 1, self.tx + tx
        self._step()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._step()

    def passed(self, parity):  # try_wait.parity: the phase of this parity has completed
        return (self.phase & 1) != parity


def _simulate_pipeline(NWG, STAGES, CLUSTER, PROMO, spts, seed, pingpong=False):
    """The wgmma kernel's producer / consumer protocol on one cluster, interleaved at random, with TMA
    copies landing late: no deadlock, every consumer step reads the bytes of its own step, and no copy
    lands in a stage that a consumer warpgroup of that CTA has not released. spts: steps of each unit
    (the kernel's units all have the same count; varying it here only stresses the ring). pingpong:
    consumer warpgroup w takes units w, w + NWG, ... and passes over the others' stages."""
    import random
    rnd = random.Random(seed)
    BOXA, BYTES_B = 8192, 4096
    stage_bytes = NWG * BOXA + BYTES_B
    full = [[_Bar(1) for _ in range(STAGES)] for _ in range(CLUSTER)]
    empty = [[_Bar((1 if pingpong else NWG) * CLUSTER) for _ in range(STAGES)] for _ in range(CLUSTER)]
    content = [[{} for _ in range(STAGES)] for _ in range(CLUSTER)]  # box -> global step that filled it
    reading = [[set() for _ in range(STAGES)] for _ in range(CLUSTER)]  # warpgroups not yet released
    inflight = []  # TMA copies: (cta, stage, box, step, barrier, bytes)
    issued = [set() for _ in range(CLUSTER)]  # ping-pong: tiles whose mainloop waits are all passed
    total = sum(spts)

    def producer(cta):
        stage, phase = 0, 0
        for j in range(total):
            yield lambda: empty[cta][stage].passed(phase ^ 1)
            full[cta][stage].arrive(tx=stage_bytes)
            for h in range(NWG):
                if h % CLUSTER == cta:
                    for dst in range(CLUSTER):  # multicast
                        inflight.append((dst, stage, ("a", h), j, full[dst][stage], BOXA))
            inflight.append((cta, stage, "b", j, full[cta][stage], BYTES_B))
            stage, phase = (0, phase ^ 1) if stage + 1 == STAGES else (stage + 1, phase)

    def consumer(cta, wg):
        stage, phase, j = 0, 0, 0
        skew = wg * (PROMO // 2) if PROMO else 0
        groups = []  # stages read by this warpgroup's wgmma groups still in flight

        def retire(keep):  # wgmma.wait_group keep
            while len(groups) > keep:
                reading[cta][groups.pop(0)].discard(wg)

        def release(s):
            assert s not in groups, "released a stage that an unfinished wgmma group reads"
            for r in range(CLUSTER):
                empty[r][s].arrive()
        def skip(n):
            nonlocal stage, phase, j
            for _ in range(n):
                stage, phase = (0, phase ^ 1) if stage + 1 == STAGES else (stage + 1, phase)
                j += 1
        for i, spt in enumerate(spts):
            if pingpong and i % NWG != wg:
                skip(spt)
                continue
            if pingpong and i > 0:  # named barrier: the other warpgroup has issued tile i - 1
                yield lambda: (i - 1) in issued[cta]
            pending = None
            for st in range(spt):
                yield lambda: full[cta][stage].passed(phase)
                boxes = content[cta][stage]
                assert len(boxes) == NWG + 1 and all(v == j for v in boxes.values()), (boxes, j)
                reading[cta][stage].add(wg)
                groups.append(stage)
                if pingpong and st == spt - 1:
                    issued[cta].add(i)
                yield lambda: True  # the group runs while others move
                if st == spt - 1 or (PROMO and (st + 1 + skew) % PROMO == 0):
                    retire(0)
                    if pending is not None:
                        release(pending)
                    release(stage)
                    pending = None
                else:
                    retire(1)
                    if pending is not None:
                        release(pending)
                    pending = stage
                stage, phase = (0, phase ^ 1) if stage + 1 == STAGES else (stage + 1, phase)
                j += 1

    actors = [producer(c) for c in range(CLUSTER)] + [consumer(c, w) for c in range(CLUSTER) for w in range(NWG)]
    waits = [next(a, None) for a in actors]
    while any(w is not None for w in waits) or inflight:
        ready = [i for i, w in enumerate(waits) if w is not None and w()]
        if inflight and (not ready or rnd.random() < 0.3):
            cta, stage, box, j, bar, nbytes = inflight.pop(rnd.randrange(len(inflight)))
            assert not reading[cta][stage], "a copy landed in a stage still being read"
            content[cta][stage][box] = j
            bar.complete_tx(nbytes)
            continue
        assert ready, "deadlock"
        i = rnd.choice(ready)
        waits[i] = next(actors[i], None)


def _emulate(impl, layout, M, N, K, na, nb, limit, cfg, splits=1, vec=True, grid=None, ap=1):
    a_k, b_k = layout
    gen = torch.Generator().manual_seed(M * 7 + N * 3 + K)
    As = [torch.randint(-4, 5, (M, K), generator=gen).double() for _ in range(na)]
    Bs = [torch.randint(-4, 5, (N, K), generator=gen).double() for _ in range(nb)]

    def store(mat, rows_first):  # memory image with row padding full of finite garbage
        t = mat if rows_first else mat.t()
        ld = -(-(t.shape[1] + 3) // 8) * 8 if vec else t.shape[1] + 3
        buf = torch.full((t.shape[0] * ld + 64,), 1e30, dtype=torch.float64)
        for r in range(t.shape[0]):
            buf[r * ld: r * ld + t.shape[1]] = t[r]
        return buf.tolist(), ld

    a_mem, b_mem = [store(a, a_k) for a in As], [store(b, b_k) for b in Bs]
    pairs = [(i, j) for s in range(limit + 1) for i in range(na) for j in range(nb) if i + j == s]
    code = sum((i | j << 2) << (4 * p) for p, (i, j) in enumerate(pairs))
    npass = len(pairs)
    if ap == 2:  # as the wrapper does for hi.B + lo.B
        assert pairs == [(0, 0), (1, 0)]
        npass, code = 1, 0
    parts = ([m for m, _ in a_mem], [m for m, _ in b_mem])
    bk = cfg.get("BK", 64)  # the wgmma kernel's k-step is 64
    kt = -(-K // bk)
    chunk = -(-kt // splits)
    splits = -(-kt // chunk)
    if impl == "wgmma":
        cl = cfg["CLUSTER"]
        units = -(-M // (64 * cfg["NWG"])) * -(-N // (cfg["BN"] * cl))
        grid = (units if grid is None else min(grid, units)) * cl  # grid: clusters
    else:
        tiles = -(-M // cfg["BM"]) * -(-N // cfg["BN"])
        grid = tiles if grid is None else min(grid, tiles)
    args = (parts, code, npass, ap, M, N, K, a_mem[0][1], b_mem[0][1], a_k, b_k)
    if impl == "wgmma":
        out = _emulate_wgmma(*args, cfg["NWG"], cfg["BN"], cfg["STAGES"], cfg["PROMO"], cfg["CLUSTER"], chunk, splits,
                             grid)
    else:
        out = _emulate_mma(*args, cfg["BM"], cfg["BN"], cfg["BK"], cfg["WM"], cfg["WN"], cfg["STAGES"], chunk,
                           splits, grid, vec)
    assert len(out) == splits * M * N  # every element of every split written exactly once
    got = torch.zeros(M, N, dtype=torch.float64)
    for (_, r, c), v in out.items():
        got[r, c] += v
    assert torch.equal(got, sum(As[i] @ Bs[j].t() for i, j in pairs))


@pytest.mark.parametrize("layout", [(True, True), (True, False), (False, False)])  # fwd, dx, dw
def test_mma_kernel_index_math(layout):
    _emulate("mma", layout, 40, 24, 70, 2, 1, 1, dict(BM=32, BN=32, BK=32, WM=2, WN=1, STAGES=3), vec=False, ap=2)
    _emulate("mma", layout, 33, 40, 48, 1, 3, 2, dict(BM=32, BN=16, BK=16, WM=2, WN=1, STAGES=2), splits=2, grid=2)


@pytest.mark.parametrize("layout", [(True, True), (True, False), (False, False)])
def test_wgmma_kernel_index_math(layout):
    bn = 16 if layout[1] else 64
    wg = dict(NWG=2, STAGES=3, PROMO=0, CLUSTER=1, PINGPONG=False)
    # hi + lo parts a stage, two consumer warpgroups, an odd M and N, K with a partial step
    _emulate("wgmma", layout, 70, 20 if layout[1] else 70, 80, 2, 1, 1, dict(wg, BN=bn), grid=1, ap=2)
    # three passes, split K, one consumer warpgroup, persistent CTAs (grid 2 over several tiles)
    _emulate("wgmma", layout, 64, 65, 130, 1, 3, 2, dict(wg, NWG=1, BN=64 if layout[1] else 128, STAGES=2),
             splits=2, grid=2, vec=False)
    # clusters of two sharing A (multicast halves), promotion every 2 steps (skewed per warpgroup)
    _emulate("wgmma", layout, 130, 70 if layout[1] else 200, 260, 1, 1, 0,
             dict(wg, BN=32 if layout[1] else 64, PROMO=2, CLUSTER=2), grid=1)


@pytest.mark.parametrize("nwg, stages, cluster, promo, pingpong", [
    (2, 3, 2, 0, False), (2, 2, 2, 4, False), (1, 2, 1, 0, False), (2, 7, 1, 8, False), (2, 3, 1, 2, False),
    (2, 4, 1, 0, True), (2, 2, 1, 0, True), (2, 3, 2, 0, True)])
def test_wgmma_pipeline_protocol(nwg, stages, cluster, promo, pingpong):
    for seed in range(20):
        spts = [1, 5, 3, 8, 2][: 2 + seed % 4] if not pingpong else [seed % 5 + 1] * (1 + seed % 5)
        _simulate_pipeline(nwg, stages, cluster, promo, spts, seed, pingpong)


def _shfl_xor(vals, m):
    return [vals[lane ^ m] for lane in range(32)]


@pytest.mark.parametrize("out_bytes", [2, 4])
def test_vector_epilogue_exchange(out_bytes):
    """The STV epilogue's lane exchanges (fp32_gemm_wgmma.cu.j2, `store`), emulated lane by lane: every
    lane ends with 16 contiguous bytes of its row, and every element of the fragment lands once."""
    BN = 64
    # fragment: lane (g, t) holds v[4j + q] = element (row g + 8 (q >= 2), column 8j + 2t + (q & 1))
    v = [[(g + 8 * (q >= 2)) * 1000 + 8 * j + 2 * t + (q & 1) for j in range(BN // 8) for q in range(4)]
         for lane in range(32) for g, t in [(lane >> 2, lane & 3)]]
    got = {}
    for qq in range(2):
        if out_bytes == 2:
            for c4 in range(BN // 32):
                a = [[(v[ln][4 * (4 * c4 + i) + 2 * qq], v[ln][4 * (4 * c4 + i) + 2 * qq + 1]) for i in range(4)]
                     for ln in range(32)]
                b = [[None] * 4 for _ in range(32)]
                for i in range(4):
                    r = _shfl_xor([a[ln][i ^ 2] for ln in range(32)], 2)
                    for ln in range(32):
                        b[ln][i] = r[ln] if ((i ^ (ln & 3)) & 2) else a[ln][i]
                for i in range(4):
                    r = _shfl_xor([b[ln][i ^ 1] for ln in range(32)], 1)
                    for ln in range(32):
                        a[ln][i] = r[ln] if ((i ^ (ln & 3)) & 1) else b[ln][i]
                for ln in range(32):
                    col = 8 * (4 * c4 + (ln & 3))
                    got[(ln, qq)] = got.get((ln, qq), []) + [(col, [x for pair in a[ln] for x in pair])]
        else:
            for p in range(BN // 16):
                x0 = [v[ln][8 * p + 2 * qq] for ln in range(32)]
                x1 = [v[ln][8 * p + 2 * qq + 1] for ln in range(32)]
                y0 = [v[ln][8 * p + 4 + 2 * qq] for ln in range(32)]
                y1 = [v[ln][8 * p + 4 + 2 * qq + 1] for ln in range(32)]
                odd = [bool(ln & 1) for ln in range(32)]
                r0 = _shfl_xor([x0[ln] if odd[ln] else y0[ln] for ln in range(32)], 1)
                r1 = _shfl_xor([x1[ln] if odd[ln] else y1[ln] for ln in range(32)], 1)
                for ln in range(32):
                    t = ln & 3
                    col = 16 * p + (8 + 2 * (t - 1) if odd[ln] else 2 * t)
                    vals = [r0[ln], r1[ln], y0[ln], y1[ln]] if odd[ln] else [x0[ln], x1[ln], r0[ln], r1[ln]]
                    got[(ln, qq)] = got.get((ln, qq), []) + [(col, vals)]
    seen = set()
    for (ln, qq), chunks in got.items():
        row = (ln >> 2) + 8 * qq
        for col, vals in chunks:
            assert len(vals) * out_bytes == 16 and col * out_bytes % 16 == 0
            assert vals == [row * 1000 + col + i for i in range(len(vals))]  # 16 contiguous bytes of the row
            seen.update((row, col + i) for i in range(len(vals)))
    assert len(seen) == 16 * BN


# ---- GPU -------------------------------------------------------------------------------------------
def _impls():
    return ["wgmma", "mma"] if torch.cuda.get_device_capability() == (9, 0) else ["mma"]


def _data(lead, e, k, dtype=BF16, wdtype=None, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*lead, k, device="cuda", generator=gen).to(dtype)
    w = torch.randn(e, k, device="cuda", generator=gen).to(wdtype or dtype)
    g = torch.randn(*lead, e, device="cuda", generator=gen) * 1e-3
    return x, w, g


def _check_logits(y, x, w, bound=1e-5):
    ref = ref_fp32_gemm_forward(x, w)
    assert y.dtype == F32 and y.shape == ref.shape and torch.isfinite(y).all()
    assert rel(y, ref) <= bound, rel(y, ref)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=2e-5 * x.shape[-1] ** 0.5)  # randn data


# (leading shape of input, n_experts, dim): B*S = 1 and 1000, 2-D and 3-D, the benchmark shape, the
# SPEC test shapes, E from 1 to 512, dim from 1 to 16384 (odd sizes take the element-load path).
SHAPES = [((1, 1), 256, 2048), ((2, 500), 256, 2048), ((2, 4096), 256, 2048), ((1000,), 256, 2048),
          ((128,), 16, 128), ((2048,), 256, 8192), ((300,), 512, 64), ((77,), 8, 16384), ((3, 37), 13, 100),
          ((37,), 13, 128), ((5,), 1, 1), ((1000,), 160, 1088)]


@pytest.mark.gpu
@pytest.mark.parametrize("lead, e, k", SHAPES)
def test_forward(lead, e, k):
    x, w, _ = _data(lead, e, k, seed=e + k)
    for impl in _impls():
        _check_logits(fp32_gemm_forward(x, w, impl=impl), x, w)
    _check_logits(FusedFp32GEMM.apply(x, w), x, w)


@pytest.mark.gpu
@pytest.mark.parametrize("lead, e, k", SHAPES)
def test_backward(lead, e, k):
    x, w, g = _data(lead, e, k, seed=3 * e + k)
    dx_ref, dw_ref = ref_fp32_gemm_backward(g, x, w)
    for impl in _impls():
        dx, dw = fp32_gemm_backward(g, x, w, impl=impl)
        assert dx.dtype == BF16 and dx.shape == x.shape and dw.dtype == BF16 and dw.shape == w.shape
        assert rel(dx, dx_ref) <= 4e-3 and rel(dw, dw_ref) <= 4e-3, (impl, rel(dx, dx_ref), rel(dw, dw_ref))
        # fp32 outputs show the accumulation itself: fp32-level with the hi/lo split of grad_output
        dx, dw = fp32_gemm_backward(g, x, w, grad_dtype=F32, impl=impl)
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
        assert rel(dx, dx_ref) <= 2e-5, (impl, rel(dx, dx_ref))
        # (a d_weight of a few elements, each a sum over tokens, can cancel: its norm-wise error is not fp32's)
        assert dw.numel() < 64 or rel(dw, dw_ref) <= 2e-5, (impl, rel(dw, dw_ref))


@pytest.mark.gpu
def test_error_report():
    """Errors against float64 at the benchmark shape, next to a plain fp32 GEMM (run with -s to see them)."""
    x, w, g = _data((2, 4096), 256, 2048, seed=7)
    y_ref = ref_fp32_gemm_forward(x, w)
    dx_ref, dw_ref = ref_fp32_gemm_backward(g, x, w)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        xf, wf, gf = x.float().reshape(-1, 2048), w.float(), g.reshape(-1, 256)
        plain = {"logits": rel(xf @ wf.t(), y_ref.reshape(-1, 256)), "d_input": rel(gf @ wf, dx_ref.reshape(-1, 2048)),
                 "d_weight": rel(gf.t() @ xf, dw_ref)}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = []
    for impl in _impls():
        y = fp32_gemm_forward(x, w, impl=impl)
        dx, dw = fp32_gemm_backward(g, x, w, grad_dtype=F32, impl=impl)
        dx1, dw1 = fp32_gemm_backward(g, x, w, grad_dtype=F32, split=False, impl=impl)
        dxb, dwb = fp32_gemm_backward(g, x, w, impl=impl)
        rows.append((impl, rel(y, y_ref), rel(dx, dx_ref), rel(dw, dw_ref), rel(dx1, dx_ref), rel(dw1, dw_ref),
                     rel(dxb, dx_ref), rel(dwb, dw_ref)))
        assert rows[-1][1] <= 1e-5 and max(rows[-1][2:4]) <= 2e-5
    print(f"\nrel error vs float64, x [2,4096,2048] bf16, w [256,2048] bf16, grad fp32; plain fp32 GEMM (no TF32): "
          f"logits {plain['logits']:.2e}, d_input {plain['d_input']:.2e}, d_weight {plain['d_weight']:.2e}")
    print("impl   logits    dx(f32,split) dw(f32,split) dx(f32,bf16 g) dw(f32,bf16 g) dx(bf16) dw(bf16)")
    for r in rows:
        print(f"{r[0]:6s} " + " ".join(f"{v:.2e}" for v in r[1:]))


@pytest.mark.gpu
def test_split_false_rounds_grad_output_to_bf16():
    x, w, g = _data((500,), 64, 256, seed=11)
    dx_ref, dw_ref = ref_fp32_gemm_backward(g.bfloat16().float(), x, w)  # what one bf16 pass computes
    for impl in _impls():
        dx, dw = fp32_gemm_backward(g, x, w, split=False, grad_dtype=F32, impl=impl)
        assert rel(dx, dx_ref) <= 2e-6 and rel(dw, dw_ref) <= 2e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, wdtype, gdtype", [(F16, F16, F32), (F32, F32, F32), (BF16, F32, F32),
                                                   (F16, BF16, F32), (BF16, BF16, BF16), (F16, F16, F16),
                                                   (BF16, BF16, F16)])
def test_other_dtypes(dtype, wdtype, gdtype):
    x, w, g = _data((3, 111), 40, 200, dtype=dtype, wdtype=wdtype, seed=5)
    g = g.to(gdtype)
    dx_ref, dw_ref = ref_fp32_gemm_backward(g, x, w)
    for impl in _impls():
        # fp16/fp32 operands: the fp32 GEMM of the up-cast values (exact parts)
        _check_logits(fp32_gemm_forward(x, w, impl=impl), x, w, bound=5e-6)
        dx, dw = fp32_gemm_backward(g, x, w, impl=impl)
        assert dx.dtype == wdtype and dw.dtype == dtype
        for got, ref in ((dx, dx_ref), (dw, dw_ref)):
            bound = {BF16: 4e-3, F16: 1e-3, F32: 2e-5}[got.dtype]
            assert rel(got, ref) <= bound, (impl, got.dtype, rel(got, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("need_x, need_w", [(True, True), (True, False), (False, True)])
def test_autograd(need_x, need_w):
    x, w, g = _data((2, 300), 64, 512, seed=13)
    xr, wr = x.clone().requires_grad_(need_x), w.clone().requires_grad_(need_w)
    y = FusedFp32GEMM.apply(xr, wr)
    _check_logits(y.detach(), x, w)
    y.backward(g)
    dx_ref, dw_ref = ref_fp32_gemm_backward(g, x, w)
    assert (xr.grad is not None) is need_x and (wr.grad is not None) is need_w
    if need_x:
        assert xr.grad.dtype == BF16 and rel(xr.grad, dx_ref) <= 4e-3
    if need_w:
        assert wr.grad.dtype == BF16 and rel(wr.grad, dw_ref) <= 4e-3
    # 2-D input through autograd too
    x2 = x.reshape(-1, 512).clone().requires_grad_()
    FusedFp32GEMM.apply(x2, w).backward(g.reshape(-1, 64))
    assert rel(x2.grad, dx_ref.reshape(-1, 512)) <= 4e-3


@pytest.mark.gpu
def test_gradient_not_requested_is_not_computed():
    x, w, g = _data((64,), 32, 128, seed=17)
    dx, dw = fp32_gemm_backward(g, x, w, need_input_grad=False)
    assert dx is None and dw is not None
    dx, dw = fp32_gemm_backward(g, x, w, need_weight_grad=False)
    assert dw is None and dx is not None


@pytest.mark.gpu
def test_empty_tokens():
    x, w, g = _data((2, 0), 256, 2048)
    y = fp32_gemm_forward(x, w)
    assert y.shape == (2, 0, 256) and y.dtype == F32
    dx, dw = fp32_gemm_backward(g, x, w)
    assert dx.shape == (2, 0, 2048) and dw.shape == (256, 2048) and (dw == 0).all()
    assert fp32_gemm_forward(x.reshape(0, 2048), w).shape == (0, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("lead", [(600,), (2, 300)])
def test_strided_inputs_left_untouched(lead):
    x, w, g = _data(lead, 64, 256, seed=19)
    wide = torch.cat([x, x], -1)[..., 256:]  # non-contiguous view
    w_t = w.t().contiguous().t()            # column-major weight
    grads = [g[..., :1, :].expand(g.shape),  # stride-0 rows
             g.transpose(-1, -2).contiguous().transpose(-1, -2)]  # column-major (strided rows in 2-D)
    before = [t.clone() for t in (wide, w_t, *grads)]
    _check_logits(fp32_gemm_forward(wide, w_t), x, w)
    for gg in grads:
        dx_ref, dw_ref = ref_fp32_gemm_backward(gg, x, w)
        dx, dw = fp32_gemm_backward(gg, wide, w_t, grad_dtype=F32)
        assert rel(dx, dx_ref) <= 2e-5 and rel(dw, dw_ref) <= 2e-5
    assert all(torch.equal(a, b) for a, b in zip(before, (wide, w_t, *grads)))


@pytest.mark.gpu
def test_deterministic_and_device_checks():
    x, w, g = _data((2, 4096), 256, 2048, seed=23)
    a = fp32_gemm_backward(g, x, w, grad_dtype=F32)
    b = fp32_gemm_backward(g, x, w, grad_dtype=F32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # split-K partials summed in a fixed order
    with pytest.raises(ValueError, match="weight"):
        fp32_gemm_forward(x, w.cpu())
    with pytest.raises(ValueError, match="impl"):
        fp32_gemm_forward(x, w, impl="cublas")
    if torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(ValueError, match="wgmma"):
            fp32_gemm_forward(x, w, impl="wgmma")


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    x, w, g = _data((2, 1000), 256, 2048, seed=29)
    fp32_gemm_forward(x, w)
    fp32_gemm_backward(g, x, w)  # compile and load outside capture
    sx, sg = x.clone(), g.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp32_gemm_forward(sx, w)
        dx, dw = fp32_gemm_backward(sg, sx, w)
    x2, _, g2 = _data((2, 1000), 256, 2048, seed=31)
    sx.copy_(x2)
    sg.copy_(g2)
    graph.replay()
    torch.cuda.synchronize()
    _check_logits(y, x2, w)
    dx_ref, dw_ref = ref_fp32_gemm_backward(g2, x2, w)
    assert rel(dx, dx_ref) <= 4e-3 and rel(dw, dw_ref) <= 4e-3
