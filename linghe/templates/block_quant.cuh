// linghe/block_quant.cuh: FP8 (e4m3) 1x128 / 128x1 block quantisation of a
// 128-row x 128-column tile of fp32 values held in registers (SPEC.md §3).
// Shared by every op that quantises (RMSNorm, SiLU, batched SiLU): this is the
// only place the scale rule, the code conversion and the layouts live.
//
// Tile mapping (VEC = values per thread per row, TPR = 128 / VEC threads per row, RPT rows per
// thread): thread t owns columns (t % TPR) * VEC + [0, VEC) and rows (t / TPR) * RPT + [0, RPT),
// so a tile takes THREADS = TPR * 128 / RPT threads (256 for VEC = 8, RPT = 8; 512 for
// VEC = 8, RPT = 4 or VEC = 4, RPT = 8; 1024 for VEC = 4, RPT = 4).
#pragma once
#include "common.cuh"

// s = max(amax / 448, 1e-30), with IEEE division; round_scale: next power of two
// on the bits (increment the exponent if the mantissa is non-zero).
//
// With round_scale no division is needed (it cost ~20 instructions a scale). amax = 1.f * 2^E with
// 1.f <= 1.75 (mantissa field <= 0x600000) gives amax / 448 = (1.f / 1.75) * 2^(E-8), in
// (2^(E-9), 2^(E-8)]: s = 2^(E-8); a larger 1.f gives 2^(E-7). Rounding the quotient first changes
// nothing: it could only matter for an amax in (448 * 2^k, 448 * 2^k * (1 + 2^-24)], and no fp32 lies
// there (the next one above 1.75 * 2^e is 1.75 * 2^e * (1 + 2^-23 / 1.75)). The floor 1e-30 rounds up
// to 2^-99 (exponent field 28), which also covers zero and subnormal maxima; +inf stays +inf. amax >= 0
// always (a max of absolute values). Checked against the division form for every fp32 in [0, +inf].
template <bool ROUND> __device__ __forceinline__ float block_scale(float amax) {
    if (ROUND) {
        const u32 b = __float_as_uint(amax);
        if (b >= 0x7f800000u) return __uint_as_float(0x7f800000u);
        const int e = (int)(b >> 23) - 8 + ((b & 0x7fffffu) > 0x600000u ? 1 : 0);
        return __uint_as_float((u32)max(e, 28) << 23);
    }
    return fmaxf(__fdiv_rn(amax, LINGHE_FP8_MAX), 1e-30f);
}

// The multiplier that replaces a division by `scale`. With round_scale the scale is a power of
// two (2^-99 .. 2^119), whose reciprocal is exact and comes from the exponent bits alone: the
// product is bit-identical to the division. Otherwise the reciprocal is correctly rounded and
// the product is within 1.5 ulp of v / s, which moves an fp8 code only when the quotient lies
// that close to a rounding midpoint (~1e-6 of codes, one step; SPEC §3.3 allows it). An IEEE
// division per element would double the tile kernels' instruction count.
template <bool ROUND> __device__ __forceinline__ float scale_inverse(float scale) {
    return ROUND ? __uint_as_float(0x7f000000u - __float_as_uint(scale)) : __frcp_rn(scale);
}
template <bool ROUND> struct Divider {
    float inv;
    __device__ __forceinline__ explicit Divider(float scale) : inv(scale_inverse<ROUND>(scale)) {}
    __device__ __forceinline__ float operator()(float v) const { return v * inv; }
};

// Four fp32 values to four e4m3 codes (round to nearest even, saturating), a in the lowest byte.
__device__ __forceinline__ u32 fp8x4(float a, float b, float c, float d) {
    u16 lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
    return (u32)lo | ((u32)hi << 16);
}

// Max over W consecutive lanes of each of R values (R <= W, both powers of two), as a
// reduce-scatter: each butterfly step sends half of the values still held, so the R maxima
// cost R - 1 + log2(W) shuffles instead of R * log2(W), and each lane ends with ONE of them:
// that of value index (lane % W) / (W / R). (Lanes past that point hold duplicates.)
template <int W, int R> __device__ __forceinline__ float max_scatter(const float (&v)[R], int lane) {
    static_assert(R >= 1 && R <= W && (R & (R - 1)) == 0 && (W & (W - 1)) == 0, "powers of two, R <= W");
    float a[R];
    #pragma unroll
    for (int i = 0; i < R; ++i) a[i] = v[i];
    int n = R;
    #pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
        if (n > 1) {
            // The upper lane of each pair keeps the upper half of the values.
            const bool upper = lane & o;
            #pragma unroll
            for (int i = 0; i < R / 2; ++i) {
                if (i < n / 2) {
                    const float send = upper ? a[i] : a[i + n / 2];
                    const float keep = upper ? a[i + n / 2] : a[i];
                    a[i] = fmaxf(keep, __shfl_xor_sync(0xffffffffu, send, o));
                }
            }
            n /= 2;
        } else {
            a[0] = fmaxf(a[0], __shfl_xor_sync(0xffffffffu, a[0], o));
        }
    }
    return a[0];
}

// Row-wise (1x128) quantisation of R block slices per lane: slice i of this lane holds E
// consecutive values of a 128-wide block whose other slices sit on the other lanes of this
// lane's group of W = 128 / E consecutive lanes (the same i on every lane of the group).
// Fills codes[i] (E fp8 codes, 4 per word, first value lowest) and returns the scale of slice
// owned(lane) = (lane % W) / (W / R2), which only the lanes with lane % (W / R2) == 0 need to
// store (R2: R rounded up to a power of two; padded slices are all-zero blocks).
template <int R> struct Pow2Up { static constexpr int value = R <= 1 ? 1 : 2 * Pow2Up<(R + 1) / 2>::value; };
template <int W, int R, int E, bool ROUND>
__device__ __forceinline__ float quant_slices(const float (&v)[R][E], int lane, u32 (&codes)[R][E / 4]) {
    constexpr int R2 = Pow2Up<R>::value, SPAN = W / R2;
    static_assert(W * E == 128 && R2 <= W, "a block is W lanes x E values; at most W slices");
    float amax[R2];
    #pragma unroll
    for (int i = 0; i < R2; ++i) {
        amax[i] = 0.0f;
        if (i < R) {
            #pragma unroll
            for (int e = 0; e < E; ++e) amax[i] = fmaxf(amax[i], fabsf(v[i < R ? i : 0][e]));
        }
    }
    // One IEEE division per lane (for the slice it owns); the lanes then fetch the scales of
    // all their slices from the owners.
    const float mine = block_scale<ROUND>(max_scatter<W, R2>(amax, lane));
    const float mine_inv = scale_inverse<ROUND>(mine);
    #pragma unroll
    for (int i = 0; i < R; ++i) {
        // With round_scale the reciprocal is one integer op; otherwise fetch the owner's.
        const float inv = ROUND ? scale_inverse<ROUND>(__shfl_sync(0xffffffffu, mine, i * SPAN, W))
                                : __shfl_sync(0xffffffffu, mine_inv, i * SPAN, W);
        #pragma unroll
        for (int e = 0; e < E / 4; ++e)
            codes[i][e] = fp8x4(v[i][4 * e] * inv, v[i][4 * e + 1] * inv, v[i][4 * e + 2] * inv, v[i][4 * e + 3] * inv);
    }
    return mine;
}

// Stores of E / 4 code words (4 or 8 bytes) with plain C++ stores: no "memory" clobber, so the
// compiler may still move loads of other data across them.
template <int WORDS> __device__ __forceinline__ void store_codes(u8* dst, const u32 (&w)[WORDS]) {
    static_assert(WORDS == 1 || WORDS == 2, "4 or 8 bytes");
    if constexpr (WORDS == 2) { vec8 v; v.w[0] = w[0]; v.w[1] = w[1]; *reinterpret_cast<vec8*>(dst) = v; }
    else *reinterpret_cast<u32*>(dst) = w[0];
}

template <int VEC, bool ROUND, int RPT = 8> struct TileQuant {
    static constexpr int TPR = 128 / VEC;
    static constexpr int GROUPS = 128 / RPT;
    static constexpr int THREADS = GROUPS * TPR;
    static constexpr int WARPS = THREADS / 32;
    static constexpr int GPW = 32 / TPR;     // row groups per warp: 2 (VEC = 8) or 1 (VEC = 4)
    static_assert(VEC == 4 || VEC == 8, "VEC must be 4 or 8");
    static_assert(RPT == 4 || RPT == 8, "RPT must be 4 or 8");

    struct Smem {
        float colpart[WARPS][128];    // per-warp column maxima (XOR-swizzled in 4-float groups)
        float colscale[128];
        u32 codes[128 * 32];          // transposed codes: 128 columns x 128 rows, swizzled
    };

    // Row-wise (1x128) quantisation. q points at code [m0, n0] (row stride ldq);
    // s points at scale [block, m0] of a block-major [N/128, M] scale tensor.
    // No barrier: the TPR threads of a row are lanes of one warp.
    __device__ static void rows(const float (&y)[RPT][VEC], int tid, int rows_valid, u8* q, i64 ldq, float* s) {
        const int c = tid % TPR, g = tid / TPR;
        u32 codes[RPT][VEC / 4];
        const float mine = quant_slices<TPR, RPT, VEC, ROUND>(y, c, codes);
        constexpr int SPAN = TPR / RPT;
        if (c % SPAN == 0 && g * RPT + c / SPAN < rows_valid) s[g * RPT + c / SPAN] = mine;
        #pragma unroll
        for (int k = 0; k < RPT; ++k)
            if (g * RPT + k < rows_valid) store_codes(q + (i64)(g * RPT + k) * ldq + c * VEC, codes[k]);
    }

    // Column-wise (128x1) quantisation, written transposed. qt points at code [n0, m0]
    // of a [N, M]-shaped output (row stride ldqt = M of this segment); st points at
    // scale [i, n0] of a [cdiv(M,128), N] scale tensor. Rows >= rows_valid must hold 0.
    // Every thread of the block must call this (it synchronises). SYNC_IN = false skips the
    // entry barrier: allowed when the previous call on the same `sm` was at least one
    // cols() call (on another Smem) earlier, whose barriers already order the reuse.
    template <bool SYNC_IN = true>
    __device__ static void cols(const float (&y)[RPT][VEC], int tid, int rows_valid, u8* qt, i64 ldqt, float* st,
                                Smem& sm) {
        const int c = tid % TPR, g = tid / TPR, lane = tid % 32, warp = tid / 32;
        if (SYNC_IN) __syncthreads();  // the previous tile's readers of sm are done
        // Column maxima of this warp's rows: over the thread's RPT rows, then (VEC = 8) over the
        // two row groups of the warp, with each lane of a pair keeping half of the columns.
        float m[VEC];
        #pragma unroll
        for (int v = 0; v < VEC; ++v) {
            m[v] = 0.0f;
            #pragma unroll
            for (int k = 0; k < RPT; ++k) m[v] = fmaxf(m[v], fabsf(y[k][v]));
        }
        // A 4-float group h (columns 4h..4h+3) sits at group h ^ ((h >> 3) & 1): the 16-byte
        // stores of each quarter-warp (groups 0, 2, .., 14 or 1, 3, .., 15) then hit distinct
        // banks, and a warp's reads (32 consecutive columns) stay conflict-free.
        if (GPW == 2) {
            const bool upper = lane & 16;
            float h[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float send = upper ? m[i] : m[i + 4];
                h[i] = fmaxf(upper ? m[i + 4] : m[i], __shfl_xor_sync(0xffffffffu, send, 16));
            }
            const int h4 = 2 * c + (upper ? 1 : 0);
            const int grp4 = h4 ^ ((h4 >> 3) & 1);
            vec16 val;
            #pragma unroll
            for (int i = 0; i < 4; ++i) val.w[i] = __float_as_uint(h[i]);
            st16_shared(&sm.colpart[warp][grp4 * 4], val);
        } else {
            #pragma unroll
            for (int half = 0; half < VEC / 4; ++half) {
                const int h4 = (VEC / 4) * c + half;
                const int grp4 = h4 ^ ((h4 >> 3) & 1);
                vec16 val;
                #pragma unroll
                for (int i = 0; i < 4; ++i) val.w[i] = __float_as_uint(m[4 * half + i]);
                st16_shared(&sm.colpart[warp][grp4 * 4], val);
            }
        }
        __syncthreads();
        if (tid < 128) {
            float amax = 0.0f;
            #pragma unroll
            for (int w = 0; w < WARPS; ++w) amax = fmaxf(amax, sm.colpart[w][tid ^ (((tid >> 5) & 1) << 2)]);
            const float scale = block_scale<ROUND>(amax);
            sm.colscale[tid] = scale;
            st[tid] = scale;
        }
        __syncthreads();
        // This thread's VEC column scales in 16-byte reads (a scalar read per column hit each
        // bank 4 times: the lanes' columns are VEC apart).
        float cs[VEC];
        #pragma unroll
        for (int i = 0; i < VEC / 4; ++i) {
            const vec16 w = ld16_shared(&sm.colscale[c * VEC + 4 * i]);
            #pragma unroll
            for (int k = 0; k < 4; ++k) cs[4 * i + k] = __uint_as_float(w.w[k]);
        }
        #pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const int col = c * VEC + v;
            const Divider<ROUND> div(cs[v]);
            const u32 lo = fp8x4(div(y[0][v]), div(y[1][v]), div(y[2][v]), div(y[3][v]));
            if (RPT == 8) {
                // 8-byte chunk g of the column's 128-byte run, XOR-swizzled so a warp's stores
                // spread over all banks.
                const u32 hi = fp8x4(div(y[RPT > 4 ? 4 : 0][v]), div(y[RPT > 5 ? 5 : 0][v]),
                                     div(y[RPT > 6 ? 6 : 0][v]), div(y[RPT > 7 ? 7 : 0][v]));
                const int chunk = g ^ ((col >> 3) & 15);
                sm.codes[col * 32 + chunk * 2] = lo;
                sm.codes[col * 32 + chunk * 2 + 1] = hi;
            } else {
                // 4-byte word g of the run, swizzled by an even mask (keeps 16-byte groups whole).
                sm.codes[col * 32 + (g ^ (((col >> 3) & 15) << 1))] = lo;
            }
        }
        __syncthreads();
        // Each column becomes one 128-byte run of a qt row: 8 threads per run, 16 bytes each.
        for (int job = tid; job < 128 * 8; job += THREADS) {
            const int col = job >> 3, part = job & 7;
            const int swz = (col >> 3) & 15;
            vec16 val;
            if (RPT == 8) {
                const int pair = ((2 * part) ^ swz) >> 1;     // the 16-byte pair holding chunks 2p, 2p+1
                const vec16 raw = ld16_shared(&sm.codes[col * 32 + pair * 4]);
                if (swz & 1) { val.w[0] = raw.w[2]; val.w[1] = raw.w[3]; val.w[2] = raw.w[0]; val.w[3] = raw.w[1]; }
                else val = raw;
            } else {
                const int mask = swz << 1;                    // word w sits at w ^ mask
                const vec16 raw = ld16_shared(&sm.codes[col * 32 + ((part ^ (mask >> 2)) << 2)]);
                if (mask & 2) { val.w[0] = raw.w[2]; val.w[1] = raw.w[3]; val.w[2] = raw.w[0]; val.w[3] = raw.w[1]; }
                else val = raw;
            }
            u8* dst = qt + (i64)col * ldqt + part * 16;
            const int first = part * 16;
            if (first + 16 <= rows_valid && (((u64)dst) & 15) == 0) {
                *reinterpret_cast<vec16*>(dst) = val;
            } else {
                #pragma unroll
                for (int b = 0; b < 16; ++b)
                    if (first + b < rows_valid) dst[b] = (u8)(val.w[b >> 2] >> (8 * (b & 3)));
            }
        }
    }
};
