"""FP8 block quantisation in plain PyTorch (SPEC.md §3.2)."""
import torch

FP8, FP8_MAX, BLK = torch.float8_e4m3fn, 448.0, 128


def round_pow2_up(s):
    """The smallest power of two >= s (s > 0, normal)."""
    m, e = torch.frexp(s)
    return torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))


def block_scale(amax, round_scale):
    s = torch.clamp(amax.float() / FP8_MAX, min=1e-30)
    return round_pow2_up(s) if round_scale else s


def quant_rows(y, round_scale):
    """y [M, N] fp32 -> codes [M, N] fp8, scales [N/128, M] (block-major)."""
    M, N = y.shape
    yb = y.reshape(M, N // BLK, BLK)
    s = block_scale(yb.abs().amax(-1), round_scale)
    return (yb / s[..., None]).to(FP8).reshape(M, N), s.t().contiguous()


def quant_cols(y, round_scale):
    """y [M, N] fp32 -> transposed codes [N, M] fp8, scales [cdiv(M,128), N]."""
    M, N = y.shape
    MB = -(-M // BLK)
    yp = y.new_zeros(MB * BLK, N)
    yp[:M] = y
    st = block_scale(yp.reshape(MB, BLK, N).abs().amax(1), round_scale)
    q = (yp.reshape(MB, BLK, N) / st[:, None, :]).reshape(MB * BLK, N)[:M]
    return q.t().contiguous().to(FP8), st


def dequant_rows(q, s):
    M, N = q.shape
    return (q.float().reshape(M, N // BLK, BLK) * s.t()[..., None]).reshape(M, N)


def dequant_cols(qt, st):
    N, M = qt.shape
    return (qt.float() * st.t().repeat_interleave(BLK, 1)[:, :M]).t()
