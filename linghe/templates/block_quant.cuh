// linghe/block_quant.cuh: FP8 (e4m3) 1x128 / 128x1 block quantisation of a
// 128-row x 128-column tile of fp32 values held in registers (SPEC.md §3).
// Shared by every op that quantises (RMSNorm, SiLU, batched SiLU): this is the
// only place the scale rule, the code conversion and the layouts live.
//
// Tile mapping (VEC = values per thread per row, TPR = 128 / VEC threads per row, RPT rows per
// thread): thread t owns columns (t % TPR) * VEC + [0, VEC) and rows (t / TPR) * RPT + [0, RPT),
// so a tile takes THREADS = TPR * 128 / RPT threads (e.g. 256 for VEC = 8, RPT = 8; 512 for
// VEC = 8, RPT = 4 or VEC = 4, RPT = 8).
#pragma once
#include "common.cuh"

// s = max(amax / 448, 1e-30), with IEEE division; round_scale: next power of two
// on the bits (increment the exponent if the mantissa is non-zero).
template <bool ROUND> __device__ __forceinline__ float block_scale(float amax) {
    float s = fmaxf(__fdiv_rn(amax, LINGHE_FP8_MAX), 1e-30f);
    if (ROUND) {
        u32 b = __float_as_uint(s);
        if (b & 0x7fffffu) b = (b & 0xff800000u) + 0x800000u;
        s = __uint_as_float(b);
    }
    return s;
}

// v / s as a multiply by the reciprocal. With round_scale the scale is a power of two
// (2^-99 .. 2^119), whose reciprocal is exact and comes from the exponent bits alone: the
// product is bit-identical to the division. Otherwise the reciprocal is correctly rounded and
// the product is within 1.5 ulp of v / s, which moves an fp8 code only when the quotient lies
// that close to a rounding midpoint (~1e-6 of codes, one step; SPEC §3.3 allows it). An IEEE
// division per element would double the tile kernels' instruction count.
template <bool ROUND> struct Divider {
    float inv;
    __device__ __forceinline__ explicit Divider(float scale)
        : inv(ROUND ? __uint_as_float(0x7f000000u - __float_as_uint(scale)) : __frcp_rn(scale)) {}
    __device__ __forceinline__ float operator()(float v) const { return v * inv; }
};

// Four fp32 values to four e4m3 codes (round to nearest even, saturating), a in the lowest byte.
__device__ __forceinline__ u32 fp8x4(float a, float b, float c, float d) {
    u16 lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
    return (u32)lo | ((u32)hi << 16);
}

template <int VEC, bool ROUND, int RPT = 8> struct TileQuant {
    static constexpr int TPR = 128 / VEC;
    static constexpr int GROUPS = 128 / RPT;
    static constexpr int THREADS = GROUPS * TPR;
    static_assert(VEC == 4 || VEC == 8, "VEC must be 4 or 8");
    static_assert(RPT == 4 || RPT == 8, "RPT must be 4 or 8");

    struct Smem {
        float colpart[GROUPS][128];   // per row-group column maxima
        float colscale[128];
        u32 codes[128 * 32];          // transposed codes: 128 columns x 128 rows, swizzled
    };

    // Row-wise (1x128) quantisation. q points at code [m0, n0] (row stride ldq);
    // s points at scale [block, m0] of a block-major [N/128, M] scale tensor.
    __device__ static void rows(const float (&y)[RPT][VEC], int tid, int rows_valid, u8* q, i64 ldq, float* s) {
        const int c = tid % TPR, g = tid / TPR;
        #pragma unroll
        for (int k = 0; k < RPT; ++k) {
            const int r = g * RPT + k;
            float amax = 0.0f;
            #pragma unroll
            for (int v = 0; v < VEC; ++v) amax = fmaxf(amax, fabsf(y[k][v]));
            amax = group_max<TPR>(amax);
            const float scale = block_scale<ROUND>(amax);
            const Divider<ROUND> div(scale);
            if (r < rows_valid) {
                u8* dst = q + (i64)r * ldq + c * VEC;
                if (VEC == 8) st8(dst, fp8x4(div(y[k][0]), div(y[k][1]), div(y[k][2]), div(y[k][3])),
                                       fp8x4(div(y[k][4]), div(y[k][5]), div(y[k][6]), div(y[k][7])));
                else *(u32*)dst = fp8x4(div(y[k][0]), div(y[k][1]), div(y[k][2]), div(y[k][3]));
                if (c == 0) s[r] = scale;
            }
        }
    }

    // Column-wise (128x1) quantisation, written transposed. qt points at code [n0, m0]
    // of a [N, M]-shaped output (row stride ldqt = M of this segment); st points at
    // scale [i, n0] of a [cdiv(M,128), N] scale tensor. Rows >= rows_valid must hold 0.
    // Every thread of the block must call this (it synchronises).
    __device__ static void cols(const float (&y)[RPT][VEC], int tid, int rows_valid, u8* qt, i64 ldqt, float* st,
                                Smem& sm) {
        const int c = tid % TPR, g = tid / TPR;
        __syncthreads();  // the previous tile's readers of sm are done
        #pragma unroll
        for (int v = 0; v < VEC; ++v) {
            float amax = 0.0f;
            #pragma unroll
            for (int k = 0; k < RPT; ++k) amax = fmaxf(amax, fabsf(y[k][v]));
            sm.colpart[g][c * VEC + v] = amax;
        }
        __syncthreads();
        if (tid < 128) {
            float amax = 0.0f;
            #pragma unroll
            for (int i = 0; i < GROUPS; ++i) amax = fmaxf(amax, sm.colpart[i][tid]);
            const float scale = block_scale<ROUND>(amax);
            sm.colscale[tid] = scale;
            st[tid] = scale;
        }
        __syncthreads();
        #pragma unroll
        for (int v = 0; v < VEC; ++v) {
            const int col = c * VEC + v;
            const Divider<ROUND> div(sm.colscale[col]);
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
                const u32* src = &sm.codes[col * 32 + pair * 4];
                if (swz & 1) { val.w[0] = src[2]; val.w[1] = src[3]; val.w[2] = src[0]; val.w[3] = src[1]; }
                else { val.w[0] = src[0]; val.w[1] = src[1]; val.w[2] = src[2]; val.w[3] = src[3]; }
            } else {
                const int mask = swz << 1;                    // word w sits at w ^ mask
                const u32* src = &sm.codes[col * 32 + ((part ^ (mask >> 2)) << 2)];
                if (mask & 2) { val.w[0] = src[2]; val.w[1] = src[3]; val.w[2] = src[0]; val.w[3] = src[1]; }
                else { val.w[0] = src[0]; val.w[1] = src[1]; val.w[2] = src[2]; val.w[3] = src[3]; }
            }
            u8* dst = qt + (i64)col * ldqt + part * 16;
            const int first = part * 16;
            if (first + 16 <= rows_valid && (((u64)dst) & 15) == 0) {
                st16(dst, val);
            } else {
                #pragma unroll
                for (int b = 0; b < 16; ++b)
                    if (first + b < rows_valid) dst[b] = (u8)(val.w[b >> 2] >> (8 * (b & 3)));
            }
        }
    }
};
