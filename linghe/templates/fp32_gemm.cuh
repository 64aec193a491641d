// linghe/fp32_gemm.cuh: pieces shared by the router GEMM kernels (fp32_gemm*.cu.j2):
// cp.async tile copies with zero-filled edges, mma.sync / wgmma wrappers, the epilogue store.
//
// Every GEMM here is C[m, n] = sum_k A[m, k] * B[n, k] over 16-bit operands (bf16 or f16)
// with fp32 accumulation. An operand is "K-major" when k is its contiguous index in memory
// and "MN-major" when m (for A) or n (for B) is.
#pragma once
#include "mbarrier.cuh"

// ---- asynchronous global -> shared copies -------------------------------------
// (cp_async_commit / cp_async_wait<N> come from common.cuh.)
// 16-byte copy that reads only `src_bytes` (0..16) bytes and zero-fills the rest.
__device__ __forceinline__ void cp_async_zfill(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void gemm_st_shared16(u32 addr, const vec16& v) {
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n"
                 :: "r"(addr), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
}

// Copy a ROWS x COLS tile of 16-bit elements, row r / column c at g[(r0 + r) * ld + c0 + c]
// (columns contiguous), into shared memory: chunk j of row r (columns 8j..8j+7) goes to the
// byte address addr(r, j). Elements with r0 + r >= rlim or c0 + c >= clim read as zero.
// VEC: cp.async 16-byte chunks, which needs ld % 8 == 0 and a 16-byte aligned g (a chunk that
// straddles clim reads only its valid bytes). Otherwise: element loads (any ld), synchronous;
// the consumer's __syncthreads makes them visible like the cp.async data.
template <int ROWS, int COLS, int THREADS, bool VEC, typename Addr>
__device__ __forceinline__ void gemm_load_tile(Addr addr, const u16* __restrict__ g, i64 ld, i64 r0, i64 rlim,
                                          i64 c0, i64 clim, int tid) {
    constexpr int CPR = COLS / 8;
    constexpr int CHUNKS = ROWS * CPR;
    static_assert(COLS % 8 == 0, "tiles are copied in 8-element chunks");
    #pragma unroll
    for (int i = 0; i < (CHUNKS + THREADS - 1) / THREADS; ++i) {
        const int idx = tid + i * THREADS;
        if (CHUNKS % THREADS == 0 || idx < CHUNKS) {
            const int r = idx / CPR, j = idx % CPR;
            const i64 gr = r0 + r, gc = c0 + j * 8;
            const u32 dst = addr(r, j);
            if constexpr (VEC) {
                const i64 left = gr < rlim ? clim - gc : 0;
                const u32 bytes = left <= 0 ? 0u : (left >= 8 ? 16u : (u32)left * 2u);
                cp_async_zfill(dst, bytes ? (const void*)(g + gr * ld + gc) : (const void*)g, bytes);
            } else {
                u32 e[8];
                #pragma unroll
                for (int q = 0; q < 8; ++q) e[q] = (gr < rlim && gc + q < clim) ? (u32)g[gr * ld + gc + q] : 0u;
                vec16 v;
                #pragma unroll
                for (int q = 0; q < 4; ++q) v.w[q] = e[2 * q] | (e[2 * q + 1] << 16);
                gemm_st_shared16(dst, v);
            }
        }
    }
}

// ---- mma.sync (sm_80+) ----------------------------------------------------------
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// d += a (16x16, row) * b (16x8, col); F16 selects f16 operands, else bf16.
template <bool F16>
__device__ __forceinline__ void mma16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (F16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// ---- wgmma (sm_90a) helpers -------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle (PTX ISA "Matrix Descriptor Format"):
// start address, leading and stride byte offsets (all >> 4), swizzle mode 1 in bits 62-63.
// Tiles start on 1024-byte boundaries, so the base-offset field stays 0.
__device__ __forceinline__ u64 wgmma_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Keep the compiler from touching accumulators while a wgmma that owns them is in flight.
template <int N> __device__ __forceinline__ void fence_regs(float (&d)[N]) {
    #pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

// ---- TMA and mbarriers (sm_90; mbar_init/expect_tx/wait come from mbarrier.cuh) ---
// A CUtensorMap (128 opaque bytes, 64-byte aligned), passed by value as a __grid_constant__ parameter.
struct __align__(64) TmaDesc { u64 w[16]; };

// Arrive on the barrier at the same shared offset in CTA `rank` of the cluster (this CTA included).
template <int CLUSTER> __device__ __forceinline__ void mbar_arrive_cluster(u32 bar, u32 rank) {
    if constexpr (CLUSTER == 1) {
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
    } else {
        u32 remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(rank));
        // (no .release.cluster: that costs a GPU-wide MEMBAR per arrival; the consumers publish no data,
        // they only say that their wgmmas, complete, no longer read the stage)
        asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" :: "r"(remote) : "memory");
    }
}
// 3-D tiled TMA load (coordinates innermost first) into this CTA's shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load3(u32 dst, const TmaDesc* map, int c0, int c1, int c2, u32 bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                 :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar) : "memory");
}
// The same box written at offset `dst` (and its bytes signalled on `bar`) in every CTA of `mask`.
__device__ __forceinline__ void tma_load3_multicast(u32 dst, const TmaDesc* map, int c0, int c1, int c2, u32 bar,
                                                    u16 mask) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3, %4}], [%5], %6;\n"
                 :: "r"(dst), "l"((u64)map), "r"(c0), "r"(c1), "r"(c2), "r"(bar), "h"(mask) : "memory");
}
// Named barriers (ids 1..15; 0 is __syncthreads): sync waits for `count` threads, arrive does not wait.
__device__ __forceinline__ void named_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void tma_prefetch_desc(const TmaDesc* map) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"((u64)map) : "memory");
}

// ---- epilogue ---------------------------------------------------------------------
// Two fp32 values rounded into one 32-bit pair of 16-bit elements (v0 in the low half), one cvt.
template <typename O> struct Pack2;
template <> struct Pack2<bf16_t> {
    __device__ static u32 run(float v0, float v1) {
        u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(v1), "f"(v0)); return r;
    } };
template <> struct Pack2<f16_t> {
    __device__ static u32 run(float v0, float v1) {
        u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(v1), "f"(v0)); return r;
    } };

// Store C[row, col] = v0 and C[row, col + 1] = v1 (col even) through `rowp` = C + row * ldc, masked to
// row_ok and columns < N. EVEN (N and ldc even): the pair is one aligned vector store, whole or not at
// all. Single predicated stores, no branches: the unrolled epilogue stays small and quick to compile.
template <typename O, bool EVEN>
__device__ __forceinline__ void gemm_store2(typename O::T* __restrict__ rowp, bool row_ok, i64 col, i64 N,
                                            float v0, float v1) {
    if constexpr (EVEN) {
        if (row_ok && col < N) {
            if constexpr (O::BYTES == 4) {
                asm volatile("st.global.v2.f32 [%0], {%1,%2};\n" :: "l"(rowp + col), "f"(v0), "f"(v1) : "memory");
            } else {
                asm volatile("st.global.u32 [%0], %1;\n" :: "l"(rowp + col), "r"(Pack2<O>::run(v0, v1)) : "memory");
            }
        }
    } else {
        if (row_ok && col < N) rowp[col] = O::store(v0);
        if (row_ok && col + 1 < N) rowp[col + 1] = O::store(v1);
    }
}
