// linghe/mbarrier.cuh: shared-memory mbarriers (sm_90), by shared-memory address, for the kernels that
// wait on the copy engine (fp32_gemm.cuh's TMA loads) or on st.async from other CTAs of a cluster
// (cluster_exchange.cuh).
#pragma once
#include "common.cuh"

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
// Make the initialised barriers visible to the async proxy (TMA) and to the other CTAs of the cluster.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One arrival that also announces `bytes` to come through complete_tx.
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
// Spin until the phase of parity `parity` has completed (a fresh barrier counts parity 1 as complete).
// The loop lives inside one asm block: no data-dependent branch for the compiler to call divergent.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred p;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra WAIT;\n}\n"
                 :: "r"(bar), "r"(parity) : "memory");
}
