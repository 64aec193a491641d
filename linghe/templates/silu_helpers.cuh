// linghe/silu_helpers.cuh: device pieces of the SiLU kernels (silu.cu.j2) other than the
// quantisation itself (that is block_quant.cuh): tile staging, the gate math, per-row
// weights, and the expert segments of the batched ops.
#pragma once
#include "common.cuh"

// ---- tile staging ---------------------------------------------------------------
// A 128-row x 128-column tile of one operand lives in shared memory row-major, 128 * BYTES
// bytes a row. Thread (c, grp) of TileQuant's mapping reads VEC elements of row grp*8+k at
// column c*VEC: 8, 16 or 32 bytes, and a warp's reads cover whole 128-byte lines (no bank conflicts).
template <typename E, int VEC> __device__ __forceinline__ void tile_row_f32(const u8* tile, int row, int c, float* out) {
    constexpr int BYTES = VEC * E::BYTES;
    static_assert(BYTES == 8 || BYTES == 16 || BYTES == 32, "a thread's slice is 8, 16 or 32 bytes");
    const u8* p = tile + row * (128 * E::BYTES) + c * BYTES;
    u32 w[BYTES / 4];
    if constexpr (BYTES == 8) {
        const u32 a = (u32)__cvta_generic_to_shared(p);
        asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "r"(a));
    } else {
        #pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            const vec16 v = ld16_shared(p + 16 * i);
            w[4 * i] = v.w[0]; w[4 * i + 1] = v.w[1]; w[4 * i + 2] = v.w[2]; w[4 * i + 3] = v.w[3];
        }
    }
    #pragma unroll
    for (int i = 0; i < BYTES / 4; ++i) {
        if constexpr (E::BYTES == 4) {
            out[i] = __uint_as_float(w[i]);
        } else {
            out[2 * i] = E::load((u16)(w[i] & 0xffffu));
            out[2 * i + 1] = E::load((u16)(w[i] >> 16));
        }
    }
}

// cp.async one 128 x 128 tile of a row-major matrix (row stride ld elements) into `tile`.
// Rows >= rows_valid are zero-filled and not read (zero decodes to 0.0 in every dtype),
// as TileQuant::cols requires of the rows past a segment's end.
// Thread t copies 16-byte piece t % PIECES of rows t / PIECES + k * RSTEP: its addresses are one
// base plus compile-time steps (a loop bound that depended on tid cost ~20 instructions a copy).
template <typename E, int THREADS> __device__ __forceinline__ void stage_tile(
        u8* tile, const typename E::T* src, i64 ld, int rows_valid, int tid) {
    constexpr int PIECES = 128 * E::BYTES / 16;   // 16-byte pieces per row
    constexpr int RSTEP = THREADS / PIECES;       // rows per pass of all threads
    static_assert(THREADS % PIECES == 0 && 128 % RSTEP == 0, "whole rows per pass");
    const int r0 = tid / PIECES, v = tid % PIECES;
    const u8* first = reinterpret_cast<const u8*>(src) + v * 16;   // row 0: always inside the segment
    const u8* from = first + (i64)r0 * ld * E::BYTES;
    u8* to = tile + r0 * (128 * E::BYTES) + v * 16;
    #pragma unroll
    for (int k = 0; k < 128 / RSTEP; ++k) {
        const bool valid = r0 + k * RSTEP < rows_valid;
        cp_async16(to + k * RSTEP * (128 * E::BYTES), valid ? from + (i64)k * RSTEP * ld * E::BYTES : first, valid);
    }
}

// ---- the backward's stash ---------------------------------------------------------
// The backward quantises da first, then db = g * sigma(a) * a (times the row weight). Instead of
// running the SiLU math again for db, the first pass parks db's fp32 bits in the staged tile, in
// this thread's own slots of a and g (each slot is read by one thread only, and it has already
// read them): all 32 bits in whichever operand is 4 bytes wide, else the high halves in a's slot
// and the low halves in g's. Stage layout: a tile, b tile, g tile (silu.cu.j2).
template <typename X, typename G, int VEC> struct Stash {
    static constexpr int XTILE = 128 * 128 * X::BYTES;
    static_assert(VEC * (X::BYTES == 4 || G::BYTES == 4 ? 4 : 2) == 16, "16 bytes per slot");
    __device__ static u8* a_slot(u8* tile, int row, int c) {
        return tile + row * (128 * X::BYTES) + c * (VEC * X::BYTES);
    }
    __device__ static u8* g_slot(u8* tile, int row, int c) {
        return tile + 2 * XTILE + row * (128 * G::BYTES) + c * (VEC * G::BYTES);
    }
    __device__ static void put(u8* tile, int row, int c, const float (&v)[VEC]) {
        if constexpr (X::BYTES == 4 || G::BYTES == 4) {
            vec16 w;
            #pragma unroll
            for (int i = 0; i < 4; ++i) w.w[i] = __float_as_uint(v[i]);
            st16_shared(X::BYTES == 4 ? a_slot(tile, row, c) : g_slot(tile, row, c), w);
        } else {
            vec16 hi, lo;
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 b0 = __float_as_uint(v[2 * i]), b1 = __float_as_uint(v[2 * i + 1]);
                hi.w[i] = __byte_perm(b0, b1, 0x7632);
                lo.w[i] = __byte_perm(b0, b1, 0x5410);
            }
            st16_shared(a_slot(tile, row, c), hi);
            st16_shared(g_slot(tile, row, c), lo);
        }
    }
    __device__ static void get(u8* tile, int row, int c, float (&v)[VEC]) {
        if constexpr (X::BYTES == 4 || G::BYTES == 4) {
            const vec16 w = ld16_shared(X::BYTES == 4 ? a_slot(tile, row, c) : g_slot(tile, row, c));
            #pragma unroll
            for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w.w[i]);
        } else {
            const vec16 hi = ld16_shared(a_slot(tile, row, c)), lo = ld16_shared(g_slot(tile, row, c));
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                v[2 * i] = __uint_as_float(__byte_perm(lo.w[i], hi.w[i], 0x5410));
                v[2 * i + 1] = __uint_as_float(__byte_perm(lo.w[i], hi.w[i], 0x7632));
            }
        }
    }
};

// ---- math -------------------------------------------------------------------------
// sigma(a) with the accurate expf and a correctly rounded reciprocal. (An earlier backward with the
// approximate ex2/rcp pair and the form 1 + a * (1 - sigma) was ~20 ulp off the float64 reference;
// with the forms below the MUFU variants further down pass the same tests on the H200 and are the
// defaults, FWD_/BWD_FAST_SIGMOID in utils/silu.py.) Written without branches: IEEE 1/x carries a slow-path branch per element,
// and those branch regions kept the compiler from overlapping the elements' MUFU latencies
// (1.25x on the H200). With t = e^-|a| in (0, 1], d = 1 + t lies in [1, 2], where MUFU.RCP plus
// one Newton step (the fast path of __frcp_rn) is the correctly rounded 1/d. For a >= 0,
// sigma = 1/d is bit-identical to 1 / (1 + expf(-a)); for a < 0, sigma = t/d (a few ulp, like
// the quotient form, and no overflow) and 1 - sigma = 1/d is correctly rounded, more accurate
// than e^-a * sigma (this passed one more backward test at round_scale=False on the H200).
__device__ __forceinline__ float rcp_1_2(float d) {   // correctly rounded 1/d for d in [1, 2]
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
    return fmaf(r, fmaf(-d, r, 1.0f), r);
}
// t = e^-|a| (e^a for a < 0, e^-a otherwise) and r = 1 / (1 + t): with the accurate expf and the
// correctly rounded reciprocal, or (FAST) from the MUFU approximations of e^x and 1/x.
template <bool FAST> __device__ __forceinline__ void exp_neg_abs_and_rcp(float a, float& t, float& r) {
    if (FAST) {
        asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(fabsf(a) * -1.4426950408889634f));
        asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + t));
    } else {
        t = expf(-fabsf(a));
        r = rcp_1_2(1.0f + t);
    }
}
// sigma(a) and the SiLU derivative factor u = 1 + a * (1 - sigma(a)) (silu'(a) = sigma * u).
// u crosses zero near a = -1.28, where 1 + a*(1 - sigma) cancels and the few-ulp error of the
// exponential becomes ~20 ulp of u. For a < 0 the factor is computed as ((1 + a) + e^a) / (1 + e^a)
// instead: 1 + a is exact there (Sterbenz) and only e^a's own error remains, ~4x less near the zero.
// FAST: the MUFU approximations (the same cancellation-free forms).
template <bool FAST> __device__ __forceinline__ void silu_sigmoid_grad(float a, float& sg, float& u) {
    float t, r;
    exp_neg_abs_and_rcp<FAST>(a, t, r);
    const float tr = t * r;
    sg = a >= 0.0f ? r : tr;
    u = a >= 0.0f ? fmaf(a, tr, 1.0f) : ((1.0f + a) + t) * r;
}
// a * sigma(a) from the two MUFU approximations: 6 instructions against ~16 for the accurate pair.
// For a >= 0 the error of e^-a is damped by t / (1 + t) <= 1/2; for a < 0 the relative error of
// silu is that of e^a: ~2 ulp of ex2 plus |a| * 2^-24 from rounding a * log2(e), under SPEC §3.3's
// scale tolerance (2e-6) for |a| < 25, where silu(a) > -4e-10 is too small to set a block's scale
// next to any ordinary value. a -> -inf gives -0 (1 / inf), a NaN stays NaN.
__device__ __forceinline__ float silu_fast(float a) {
    float t, r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(a * -1.4426950408889634f));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + t));
    return a * r;
}
__device__ __forceinline__ float silu_sigmoid(float a) {
    float t, r;
    exp_neg_abs_and_rcp<false>(a, t, r);
    return a >= 0.0f ? r : t * r;
}

// A per-row weight or weight gradient, dtype chosen at run time (0: f32, 1: bf16, 2: f16):
// one scalar per row, so a branch costs nothing and saves specialisations.
__device__ __forceinline__ float load_weight(const void* w, i64 i, int kind) {
    if (kind == 0) return ((const float*)w)[i];
    const u16 v = ((const u16*)w)[i];
    return kind == 1 ? bf16_to_f32(v) : f16_to_f32(v);
}
__device__ __forceinline__ void store_weight(void* w, i64 i, float v, int kind) {
    if (kind == 0) ((float*)w)[i] = v;
    else ((u16*)w)[i] = kind == 1 ? f32_to_bf16(v) : f32_to_f16(v);
}

// ---- expert segments ----------------------------------------------------------------
// Expert e owns rows [seg[e], seg[e+1]) of x and row tiles [tile[e], tile[e+1]) of the
// work list: exclusive prefix sums of counts[e] and cdiv(counts[e], 128), built once per
// (persistent) CTA in shared memory from the device counts (int32 or int64): no host sync.
__device__ __forceinline__ i64 shfl_up_i64(i64 v, int off) {
    const int lo = __shfl_up_sync(0xffffffffu, (int)(u32)(u64)v, off);
    const int hi = __shfl_up_sync(0xffffffffu, (int)((u64)v >> 32), off);
    return (i64)(((u64)(u32)hi << 32) | (u64)(u32)lo);
}
__device__ __forceinline__ i64 shfl_idx_i64(i64 v, int src) {
    const int lo = __shfl_sync(0xffffffffu, (int)(u32)(u64)v, src);
    const int hi = __shfl_sync(0xffffffffu, (int)((u64)v >> 32), src);
    return (i64)(((u64)(u32)hi << 32) | (u64)(u32)lo);
}

// Called by every thread of the CTA (it synchronises). The counts are read once into seg[]
// (all loads in flight together), then one warp turns them into prefix sums, 32 at a time.
__device__ void build_segments(const void* counts, int cbytes, int E, i64* seg, int* tile) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const i64 v = cbytes == 8 ? ((const i64*)counts)[e] : (i64)((const int*)counts)[e];
        seg[e] = v > 0 ? v : 0;   // negative counts are invalid input: treat as empty, never index with them
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        i64 row_base = 0;
        int tile_base = 0;
        #pragma unroll 1
        for (int base = 0; base < E; base += 32) {
            const int e = base + lane;
            const i64 rows = e < E ? seg[e] : 0;
            const int tiles = (int)((rows + 127) >> 7);
            i64 rows_incl = rows;
            int tiles_incl = tiles;
            #pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const i64 r = shfl_up_i64(rows_incl, off);
                const int n = __shfl_up_sync(0xffffffffu, tiles_incl, off);
                if (lane >= off) { rows_incl += r; tiles_incl += n; }
            }
            if (e < E) { seg[e] = row_base + rows_incl - rows; tile[e] = tile_base + tiles_incl - tiles; }
            row_base += shfl_idx_i64(rows_incl, 31);
            tile_base += __shfl_sync(0xffffffffu, tiles_incl, 31);
        }
        if (lane == 0) { seg[E] = row_base; tile[E] = tile_base; }
    }
    __syncthreads();
}

// The expert of row tile t: the largest e < E with tile[e] <= t (so empty experts, whose
// tile range is empty, are skipped). E >= 1 and tile[0] = 0 <= t.
__device__ __forceinline__ int find_expert(const int* tile, int E, i64 t) {
    int lo = 0, hi = E - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}
