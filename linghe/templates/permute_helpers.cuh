// linghe/permute_helpers.cuh: byte-vector copies and row-map compaction shared by
// the MoE permute / unpermute kernels (SPEC.md §4.4, §4.5).
#pragma once
#include "common.cuh"

// A register holding B bytes (B = 1, 2, 4, 8 or 16), moved with one load/store.
template <int B> struct VecOf;
template <> struct VecOf<16> { typedef vec16 T; };
template <> struct VecOf<8> { typedef vec8 T; };
template <> struct VecOf<4> { typedef u32 T; };
template <> struct VecOf<2> { typedef u16 T; };
template <> struct VecOf<1> { typedef u8 T; };

// Load B bytes from a B-aligned address. STREAM: data read once (evict first).
template <int B, bool STREAM = false>
__device__ __forceinline__ typename VecOf<B>::T load_bytes(const void* p) {
    if constexpr (B == 16) {
        return STREAM ? ld16_stream(p) : ld16(p);
    } else {
        return *(const typename VecOf<B>::T*)p;
    }
}
template <int B> __device__ __forceinline__ void store_bytes(void* p, const typename VecOf<B>::T& v) {
    if constexpr (B == 16) {
        st16(p, v);
    } else {
        *(typename VecOf<B>::T*)p = v;
    }
}
template <int B> __device__ __forceinline__ typename VecOf<B>::T zero_bytes() {
    typename VecOf<B>::T z;
    if constexpr (B == 16) { z.w[0] = z.w[1] = z.w[2] = z.w[3] = 0u; }
    else if constexpr (B == 8) { z.w[0] = z.w[1] = 0u; }
    else { z = 0; }
    return z;
}

// The elements of type E inside a B-byte vector (B a multiple of E::BYTES).
template <typename E, int B> union Lanes {
    typename VecOf<B>::T v;
    typename E::T e[B / E::BYTES];
};

// An unsigned integer of B bytes (B = 1, 2, 4, 8): single elements of any dtype.
template <int B> struct UIntOf;
template <> struct UIntOf<1> { typedef u8 T; };
template <> struct UIntOf<2> { typedef u16 T; };
template <> struct UIntOf<4> { typedef u32 T; };
template <> struct UIntOf<8> { typedef u64 T; };

__device__ __forceinline__ u32 lanemask_lt() {
    u32 m; asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m)); return m;
}
