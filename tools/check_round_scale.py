"""The claim behind block_quant.cuh's block_scale<true>: for every fp32 amax in [0, +inf], the integer
form (exponent field - 8, +1 when the mantissa field exceeds 0x600000, at least 28; +inf kept) equals
max(amax / 448 rounded to fp32, 1e-30) raised to the next power of two. Enumerates all 2^31 patterns on
the CPU in torch (about a minute): python3 tools/check_round_scale.py
"""
import torch


def division_form(bits):
    s = torch.clamp_min(bits.view(torch.float32) / torch.tensor(448.0), 1e-30).view(torch.int32)
    return torch.where((s & 0x7FFFFF) != 0, (s & ~0x7FFFFF) + 0x800000, s)


def integer_form(bits):
    e = (bits >> 23) - 8 + ((bits & 0x7FFFFF) > 0x600000).int()
    return torch.where(bits >= 0x7F800000, torch.full_like(bits, 0x7F800000), torch.clamp_min(e, 28) << 23)


def main():
    step, last, bad = 1 << 26, 0x7F800000, 0
    for lo in range(0, last + 1, step):
        bits = torch.arange(lo, min(lo + step, last + 1), dtype=torch.int64).to(torch.int32)
        diff = division_form(bits) != integer_form(bits)
        if diff.any():
            i = int(diff.nonzero()[0])
            print(f"differs at amax bits {int(bits[i]):#x}")
        bad += int(diff.sum())
    print(f"{bad} differences over every fp32 in [0, +inf]")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
