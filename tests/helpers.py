"""Shared test helpers: poisoning outputs and SPEC.md §3.3 checks of quantised outputs."""
from __future__ import annotations

import torch

from linghe.reference import dequant_cols, dequant_rows

FP8 = torch.float8_e4m3fn


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (fp8: 0x7f is NaN in e4m3fn), so any element left unwritten shows."""
    if t is None:
        return t
    if t.dtype == FP8:
        t.view(torch.uint8).fill_(0x7F)
    elif t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-12345)
    return t


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_scales(actual, expected, round_scale, what="scale", rtol=2e-6):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries (unwritten?)"
    if round_scale:
        differ = actual != expected
        if differ.any():
            ratio = (actual[differ] / expected[differ])
            assert ((ratio == 2.0) | (ratio == 0.5)).all(), f"{what}: power-of-two scales differ by other than 2x"
            assert differ.float().mean() <= 1e-4 + 1.0 / differ.numel(), f"{what}: too many 2x differences"
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=0, msg=lambda m: f"{what}: {m}")


def _check_codes(deq, q, q_ref, s_b, s_ref_b, y_ref, what):
    """deq/q/q_ref/y_ref in one orientation; s_b, s_ref_b broadcast to it."""
    y_ref = y_ref.double()
    bound = 2.0 ** -4 * y_ref.abs() + 2.0 ** -9 * s_b.double()
    bad = (deq.double() - y_ref).abs() > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} dequantised values off the reference, e.g. got "
                           f"{deq[bad][:4].tolist()} want {y_ref[bad][:4].tolist()}")
    same_scale = s_b == s_ref_b
    codes = q.view(torch.uint8).long()
    codes_ref = q_ref.view(torch.uint8).long()
    if same_scale.any():
        equal = (codes == codes_ref)[same_scale]
        assert equal.float().mean() >= 0.999, f"{what}: only {float(equal.float().mean()):.5f} codes bit-identical"
        # an adjacent code: same sign, magnitudes one step apart (e4m3 codes are monotone in magnitude)
        diff = (codes - codes_ref)[same_scale]
        assert (diff.abs() <= 1).all(), f"{what}: codes differ by more than one step"


def assert_rowwise(q, s, y_ref, round_scale, what="row-wise", scale_rtol=2e-6):
    """q [M, N] fp8, s [N/128, M] vs the reference quantisation of y_ref [M, N] fp32."""
    from linghe.reference import quant_rows

    q, s, y_ref = q.cpu(), s.cpu(), y_ref.cpu().float()
    q_ref, s_ref = quant_rows(y_ref, round_scale)
    assert q.shape == q_ref.shape and q.dtype == FP8, f"{what}: codes {tuple(q.shape)} {q.dtype}"
    assert_scales(s, s_ref, round_scale, f"{what} scales", scale_rtol)
    M, N = q.shape
    s_b = s.t().repeat_interleave(128, 1)
    s_ref_b = s_ref.t().repeat_interleave(128, 1)
    _check_codes(dequant_rows(q, s), q, q_ref, s_b, s_ref_b, y_ref, f"{what} codes")


def assert_colwise(qt, st, y_ref, round_scale, what="transposed", scale_rtol=2e-6):
    """qt [N, M] fp8, st [cdiv(M,128), N] vs the reference column-wise quantisation of y_ref [M, N]."""
    from linghe.reference import quant_cols

    qt, st, y_ref = qt.cpu(), st.cpu(), y_ref.cpu().float()
    qt_ref, st_ref = quant_cols(y_ref, round_scale)
    assert qt.shape == qt_ref.shape and qt.dtype == FP8, f"{what}: codes {tuple(qt.shape)} {qt.dtype}"
    assert_scales(st, st_ref, round_scale, f"{what} scales", scale_rtol)
    N, M = qt.shape
    s_b = st.t().repeat_interleave(128, 1)[:, :M].t()
    s_ref_b = st_ref.t().repeat_interleave(128, 1)[:, :M].t()
    _check_codes(dequant_cols(qt, st), qt.t(), qt_ref.t(), s_b, s_ref_b, y_ref, f"{what} codes")


def preset_constants(prewarm):
    """Every distinct (kernel, constants) an op's prewarm function yields over all presets."""
    from linghe import presets

    seen = []
    for name in sorted(presets.PRESETS):
        for kernel, constants in prewarm(presets.get(name)):
            if (kernel, constants) not in seen:
                seen.append((kernel, constants))
    return seen


def assert_same(a, b, path="out"):
    """Nested outputs (tensors, tuples, None) equal bit for bit: shapes, dtypes, devices, values."""
    if a is None or b is None:
        assert a is None and b is None, path
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, path
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{path}: values differ"
