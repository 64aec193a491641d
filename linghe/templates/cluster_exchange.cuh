// linghe/cluster_exchange.cuh: small values sent between the CTAs of a thread-block cluster with
// st.async, completing on an mbarrier of the receiver (sm_90).
//
// Why not barrier.cluster + ld.shared::cluster: a cluster barrier that publishes shared-memory
// writes needs release semantics, which ptxas implements as MEMBAR.ALL.GPU: every thread then
// waits for all of its outstanding memory operations, stores of the previous tile included,
// once per exchange. st.async carries its own completion: no fence.
#pragma once
#include "common.cuh"

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
// The shared::cluster address, in CTA `rank`, of the variable at `local` in ours.
__device__ __forceinline__ u32 cluster_addr(u32 local, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
    return r;
}
__device__ __forceinline__ void mbar_init(u64* bar, u32 arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_u32(bar)), "r"(arrivals) : "memory");
}
// Makes initialised barriers visible to the cluster (follow with a cluster barrier).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// One arrival that also announces `bytes` to come through complete_tx.
__device__ __forceinline__ void mbar_arrive_expect(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    const u32 a = smem_u32(bar);
    u32 done;
    do {
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                     : "=r"(done) : "r"(a), "r"(parity) : "memory");
    } while (!done);
}
// 16 bytes to CTA `rank`: stored at the address of `dst` in its shared memory, counted on its
// barrier at the address of `bar`.
__device__ __forceinline__ void st_async16(const void* dst, const u64* bar, u32 rank, const vec16& v) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 :: "r"(cluster_addr(smem_u32(dst), rank)), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]),
                    "r"(cluster_addr(smem_u32(bar), rank)) : "memory");
}
