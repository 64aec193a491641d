// linghe/cluster_exchange.cuh: small values sent between the CTAs of a thread-block cluster with
// st.async, completing on an mbarrier of the receiver (sm_90).
//
// Why not barrier.cluster + ld.shared::cluster: a cluster barrier that publishes shared-memory
// writes needs release semantics, which ptxas implements as MEMBAR.ALL.GPU: every thread then
// waits for all of its outstanding memory operations, stores of the previous tile included,
// once per exchange. st.async carries its own completion: no fence.
#pragma once
#include "mbarrier.cuh"  // smem_u32 and the mbarrier helpers

// The shared::cluster address, in CTA `rank`, of the variable at `local` in ours.
__device__ __forceinline__ u32 cluster_addr(u32 local, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
    return r;
}
// 16 bytes to CTA `rank`: stored at the address of `dst` in its shared memory, counted on its
// barrier at the address of `bar`.
__device__ __forceinline__ void st_async16(const void* dst, const u64* bar, u32 rank, const vec16& v) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 :: "r"(cluster_addr(smem_u32(dst), rank)), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]),
                    "r"(cluster_addr(smem_u32(bar), rank)) : "memory");
}
