// linghe/rope.cuh: pieces shared by the QK-norm + half-RoPE forward and backward kernels (SPEC.md §4.2).
//
// Work split. A head of D lanes is cut into four quarters of D4 = D/4 lanes. Item (slot, t) is one
// thread: it holds lanes [t*VEC, t*VEC+VEC) of all four quarters of one head slot. The rotation pairs
// lane k with lane k+D4, i.e. quarter 0 with quarter 1 at the same offset, so both partners always
// sit in the same thread and the rotation needs no shuffles. The T = D4/VEC threads of a head are
// padded to TP (a power of two <= 32) consecutive lanes of one warp, so the per-head sums are
// butterfly shuffles over TP lanes; padding lanes hold zeros.
#pragma once
#include "common.cuh"

// VEC consecutive elements of type E as raw storage: loaded and stored with one vector instruction
// where the size allows (16-byte pieces, 8, 4 or 2 bytes), unpacked lane by lane.
template <typename E, int VEC> struct Chunk {
    static constexpr int BYTES = VEC * E::BYTES;
    static constexpr int WORDS = BYTES >= 4 ? BYTES / 4 : 1;
    union { u32 w[WORDS]; typename E::T e[VEC]; };

    __device__ __forceinline__ void zero() {
        #pragma unroll
        for (int i = 0; i < WORDS; ++i) w[i] = 0u;
    }
    __device__ __forceinline__ void load(const void* p) {
        if constexpr (BYTES % 16 == 0) {
            #pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                const vec16 v = ld16((const u8*)p + 16 * i);
                #pragma unroll
                for (int j = 0; j < 4; ++j) w[4 * i + j] = v.w[j];
            }
        } else if constexpr (BYTES == 8) {
            asm volatile("ld.global.v2.u32 {%0,%1}, [%2];" : "=r"(w[0]), "=r"(w[1]) : "l"(p));
        } else if constexpr (BYTES == 4) {
            asm volatile("ld.global.u32 %0, [%1];" : "=r"(w[0]) : "l"(p));
        } else {
            static_assert(BYTES == 2, "chunk size");
            u16 h;
            asm volatile("ld.global.u16 %0, [%1];" : "=h"(h) : "l"(p));
            w[0] = h;
        }
    }
    __device__ __forceinline__ void store(void* p) const {
        if constexpr (BYTES % 16 == 0) {
            #pragma unroll
            for (int i = 0; i < BYTES / 16; ++i) {
                vec16 v;
                #pragma unroll
                for (int j = 0; j < 4; ++j) v.w[j] = w[4 * i + j];
                st16((u8*)p + 16 * i, v);
            }
        } else if constexpr (BYTES == 8) {
            st8(p, w[0], w[1]);
        } else if constexpr (BYTES == 4) {
            asm volatile("st.global.u32 [%0], %1;" :: "l"(p), "r"(w[0]) : "memory");
        } else {
            asm volatile("st.global.u16 [%0], %1;" :: "l"(p), "h"((u16)w[0]) : "memory");
        }
    }
    __device__ __forceinline__ float get(int i) const { return E::load(e[i]); }
    __device__ __forceinline__ void set(int i, float f) { e[i] = E::store(f); }
};

// Ask L2 for the line holding p (no register is tied up waiting for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}

// VEC consecutive floats of a shared-memory table into registers: 16-byte reads where VEC allows (a
// thread's lanes start at a multiple of VEC, and the tables and their quarters are 16-byte aligned).
template <int VEC> __device__ __forceinline__ void load_lanes(const float* p, float (&out)[VEC]) {
    if constexpr (VEC % 4 == 0) {
        #pragma unroll
        for (int i = 0; i < VEC; i += 4) {
            const float4 v = *reinterpret_cast<const float4*>(p + i);
            out[i] = v.x; out[i + 1] = v.y; out[i + 2] = v.z; out[i + 3] = v.w;
        }
    } else {
        #pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = p[i];
    }
}

// Which head slot of the fused [.., (H + 2*HKV) * D] row a thread works on, and what that slot is.
// Slots are interleaved by query group: group g holds W = H/HKV query heads, then key head g, then
// value head g.
enum SlotKind { KIND_Q = 0, KIND_K = 1, KIND_V = 2 };

template <int H, int HKV, int T, int TP, int SP, int VEC> struct Item {
    static constexpr int W = H / HKV, SLOTS = H + 2 * HKV;
    int slot, kind, head, e;  // e: first lane of this thread inside each quarter
    bool active;

    __device__ __forceinline__ Item(int tid, int pass) {
        const int local = tid / TP, t = tid % TP;
        slot = pass * SP + local;
        active = local < SP && slot < SLOTS && t < T;
        const int s = slot < SLOTS ? slot : SLOTS - 1;  // inactive threads still get in-range indices
        const int grp = s / (W + 2), r = s - grp * (W + 2);
        kind = r < W ? KIND_Q : (r == W ? KIND_K : KIND_V);
        head = r < W ? grp * W + r : grp;
        // Padding lanes (t >= T) read lanes of thread 0 from shared memory: their own lane offset would
        // run past the weight and angle arrays. They hold zeros, so what they read adds nothing.
        e = (t < T ? t : 0) * VEC;
    }
};


// Ask L2 for the 128-byte lines of one head row [p, p + bytes): thread t of the T threads of the head
// takes lines t, t+T, ... One request per line, instead of one per thread and vector.
template <int T> __device__ __forceinline__ void prefetch_row_l2(const void* p, int bytes, int t) {
    const u64 a = (u64)p, end = a + (u64)bytes;
    for (u64 line = (a & ~(u64)127) + (u64)t * 128; line < end; line += (u64)T * 128) prefetch_l2((const void*)line);
}

// Asynchronous copy of one chunk (4, 8 or 16 bytes, aligned to its size) from global memory to the
// shared-memory address dst.
template <int BYTES> __device__ __forceinline__ void cp_async_chunk(u32 dst, const void* gmem) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(dst), "l"(gmem), "n"(BYTES) : "memory");
}
