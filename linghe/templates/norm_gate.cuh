// linghe/templates/norm_gate.cuh: device helpers of the GroupNormGate kernels (SPEC.md §4.13).
//
// The kernels move VE consecutive channels per vector (VE = 1, 2, 4 or 8, the largest that divides
// the group width d), so a row's vectors are aligned to VE * element bytes whatever dim is, given a
// 16-byte aligned base (the wrappers guarantee it).
#pragma once
#include "common.cuh"

// VE consecutive elements of type E, kept as the raw packed words of one vector load: half the
// registers of fp32 values for 2-byte types, unpacked to fp32 where used.
template <typename E, int VE> struct Packed {
    static constexpr int BYTES = VE * E::BYTES;
    static constexpr int WORDS = BYTES >= 4 ? BYTES / 4 : 1;
    u32 w[WORDS];

    __device__ __forceinline__ void zero() {
        #pragma unroll
        for (int i = 0; i < WORDS; ++i) w[i] = 0u;
    }

    // STREAM: evict-first, for the last read of data (x, gate, grad); else default caching (weight,
    // which every token re-reads; the backward's first pass, which its second pass reads again).
    // The loads are volatile asm on purpose: the compiler must not merge a re-read with the first read.
    template <bool STREAM> __device__ __forceinline__ void load(const void* p) {
        if constexpr (BYTES >= 16) {
            #pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                vec16 v;
                if constexpr (STREAM) v = ld16_stream((const u8*)p + 16 * i);
                else v = ld16((const u8*)p + 16 * i);
                #pragma unroll
                for (int k = 0; k < 4; ++k) w[4 * i + k] = v.w[k];
            }
        } else if constexpr (BYTES == 8) {
            if constexpr (STREAM) asm volatile("ld.global.cs.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
            else asm volatile("ld.global.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
        } else if constexpr (BYTES == 4) {
            if constexpr (STREAM) asm volatile("ld.global.cs.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
            else asm volatile("ld.global.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
        } else {
            u16 h;
            if constexpr (STREAM) asm volatile("ld.global.cs.u16 %0, [%1];" : "=h"(h) : "l"(p));
            else asm volatile("ld.global.u16 %0, [%1];" : "=h"(h) : "l"(p));
            w[0] = h;
        }
    }

    // The vector at shared-memory address a (aligned to its size).
    __device__ __forceinline__ void load_shared(u32 a) {
        if constexpr (BYTES >= 16) {
            #pragma unroll
            for (int i = 0; i < BYTES / 16; ++i)
                asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[4 * i]), "=r"(w[4 * i + 1]),
                             "=r"(w[4 * i + 2]), "=r"(w[4 * i + 3]) : "r"(a + 16 * i));
        } else if constexpr (BYTES == 8) {
            asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "r"(a));
        } else {
            static_assert(BYTES == 4, "staged vectors are 4, 8 or 16+ bytes");
            asm volatile("ld.shared.u32 %0, [%1];" : "=r"(w[0]) : "r"(a));
        }
    }

    // Element i as fp32 (i is a compile-time constant after unrolling). Little-endian: element 2k is
    // the low half of word k.
    __device__ __forceinline__ float get(int i) const {
        if constexpr (E::BYTES == 4) return __uint_as_float(w[i]);
        else return E::load((u16)(w[i >> 1] >> ((i & 1) * 16)));
    }
};

// Two fp32 values rounded to one packed word of 2-byte elements (lo in the low half).
__device__ __forceinline__ u32 pack_pair(bf16_t, float lo, float hi) {
    u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ u32 pack_pair(f16_t, float lo, float hi) {
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}

// Store VE fp32 values as elements of type E at p (aligned to VE * E::BYTES).
template <typename E, int VE> __device__ __forceinline__ void store_vec(void* p, const float* v) {
    constexpr int BYTES = VE * E::BYTES;
    if constexpr (BYTES == 2) {
        const u16 h = E::store(v[0]);
        asm volatile("st.global.u16 [%0], %1;" :: "l"(p), "h"(h) : "memory");
    } else {
        constexpr int WORDS = BYTES / 4;
        u32 w[WORDS];
        #pragma unroll
        for (int i = 0; i < WORDS; ++i) {
            if constexpr (E::BYTES == 4) w[i] = __float_as_uint(v[i]);
            else w[i] = pack_pair(E(), v[2 * i], v[2 * i + 1]);
        }
        if constexpr (BYTES >= 16) {
            #pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                vec16 q;
                #pragma unroll
                for (int k = 0; k < 4; ++k) q.w[k] = w[4 * i + k];
                st16((u8*)p + 16 * i, q);
            }
        } else if constexpr (BYTES == 8) {
            st8(p, w[0], w[1]);
        } else {
            asm volatile("st.global.u32 [%0], %1;" :: "l"(p), "r"(w[0]) : "memory");
        }
    }
}

// p[i] += a[i] * b[i] for VE floats at p (shared or global, aligned to VE * 4 bytes when VE is 2, 4 or 8).
struct __align__(16) f32x4 { float v[4]; };
struct __align__(8) f32x2 { float v[2]; };
template <int VE> __device__ __forceinline__ void fma_into(float* p, const float* a, const float* b) {
    if constexpr (VE % 4 == 0) {
        #pragma unroll
        for (int q = 0; q < VE / 4; ++q) {
            f32x4 t = reinterpret_cast<f32x4*>(p)[q];
            #pragma unroll
            for (int i = 0; i < 4; ++i) t.v[i] = fmaf(a[4 * q + i], b[4 * q + i], t.v[i]);
            reinterpret_cast<f32x4*>(p)[q] = t;
        }
    } else if constexpr (VE == 2) {
        f32x2 t = *reinterpret_cast<f32x2*>(p);
        t.v[0] = fmaf(a[0], b[0], t.v[0]);
        t.v[1] = fmaf(a[1], b[1], t.v[1]);
        *reinterpret_cast<f32x2*>(p) = t;
    } else {
        p[0] = fmaf(a[0], b[0], p[0]);
    }
}

// σ(z) = 1/(1 + 2^(-z*log2(e))) with the MUFU approximations (about 2 ulp each) and flush-to-zero:
// a denormal 2^(...) is 0 next to 1 anyway, and 1/(1+inf) = 0 for very negative z, as it should.
// (__expf and __fdividef add denormal fix-ups that cost 3 more instructions per element.)
__device__ __forceinline__ float gate_sigmoid(float z) {
    float e, s;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(z * -1.4426950408889634f));
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(s) : "f"(1.0f + e));
    return s;
}
// Sum NVAL values over the TPG consecutive threads of a group (TPG a power of two, the group's
// first thread a multiple of TPG). Every thread of the CTA must call it (it may hold a barrier).
// TPG <= 32: butterfly inside the aligned lane group; every lane ends with the same bits.
// TPG > 32: the group is TPG/32 whole warps; warp totals go through `buf` (NVAL floats per warp of
// the CTA) and every thread adds its group's warp totals in warp order (fixed order: deterministic).
// Callers alternate two buffers, so one barrier per call suffices: a buffer is rewritten only after
// the next call's barrier, which every reader of its previous contents has passed.
template <int TPG, int NVAL> __device__ __forceinline__ void group_reduce(float (&v)[NVAL], float* buf) {
    #pragma unroll
    for (int i = 0; i < NVAL; ++i) v[i] = group_sum<(TPG < 32 ? TPG : 32)>(v[i]);
    if constexpr (TPG > 32) {
        constexpr int WPG = TPG / 32;
        const int warp = threadIdx.x / 32;
        if (threadIdx.x % 32 == 0) {
            #pragma unroll
            for (int i = 0; i < NVAL; ++i) buf[warp * NVAL + i] = v[i];
        }
        __syncthreads();
        const int first = warp / WPG * WPG;
        #pragma unroll
        for (int i = 0; i < NVAL; ++i) {
            float s = 0.0f;
            #pragma unroll
            for (int k = 0; k < WPG; ++k) s += buf[(first + k) * NVAL + i];
            v[i] = s;
        }
    }
}

// Asynchronous copy of one vector (4, 8 or a multiple of 16 bytes, aligned) from global memory to the
// shared-memory address dst; zeros, and no read, when !valid.
template <int BYTES> __device__ __forceinline__ void cp_async_vec(u32 dst, const void* src, bool valid) {
    if constexpr (BYTES >= 16) {
        #pragma unroll
        for (int i = 0; i < BYTES / 16; ++i)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst + 16 * i),
                         "l"((const u8*)src + 16 * i), "r"(valid ? 16 : 0) : "memory");
    } else {
        static_assert(BYTES == 4 || BYTES == 8, "cp.async copies 4, 8 or 16 bytes");
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" :: "r"(dst), "l"(src), "n"(BYTES),
                     "r"(valid ? BYTES : 0) : "memory");
    }
}
