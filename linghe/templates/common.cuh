// linghe/common.cuh: the small device vocabulary every kernel shares.
// Written without CUDA toolkit headers: NVRTC compiles it with no include path,
// which keeps a cold compile well under the 150 ms target.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

struct __align__(16) vec16 { u32 w[4]; };   // one 16-byte vector of any element type
struct __align__(8) vec8 { u32 w[2]; };

#define LINGHE_FP8_MAX 448.0f

// ---- scalar conversions (storage type <-> fp32) -------------------------
// Storage types are named by the tag the templates use: bf16, f16, f32.
__device__ __forceinline__ float bf16_to_f32(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r;
}
__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f)); return r;
}

// Element traits: storage type, width, conversions.
struct bf16_t { typedef u16 T; static constexpr int BYTES = 2;
    __device__ static float load(u16 v) { return bf16_to_f32(v); }
    __device__ static u16 store(float f) { return f32_to_bf16(f); } };
struct f16_t { typedef u16 T; static constexpr int BYTES = 2;
    __device__ static float load(u16 v) { return f16_to_f32(v); }
    __device__ static u16 store(float f) { return f32_to_f16(f); } };
struct f32_t { typedef float T; static constexpr int BYTES = 4;
    __device__ static float load(float v) { return v; }
    __device__ static float store(float f) { return f; } };

// Unpack a 16-byte vector of elements of type E into fp32 values.
template <typename E> struct Unpack;
template <> struct Unpack<bf16_t> { static constexpr int N = 8;
    __device__ static void run(const vec16& v, float* out) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) { out[2*i] = __uint_as_float(v.w[i] << 16); out[2*i+1] = __uint_as_float(v.w[i] & 0xffff0000u); }
    } };
template <> struct Unpack<f16_t> { static constexpr int N = 8;
    __device__ static void run(const vec16& v, float* out) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) { out[2*i] = f16_to_f32((u16)(v.w[i] & 0xffff)); out[2*i+1] = f16_to_f32((u16)(v.w[i] >> 16)); }
    } };
template <> struct Unpack<f32_t> { static constexpr int N = 4;
    __device__ static void run(const vec16& v, float* out) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(v.w[i]);
    } };

// ---- memory ---------------------------------------------------------------
__device__ __forceinline__ vec16 ld16(const void* p) {
    vec16 v; asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p)); return v;
}
// Streaming load that does not stay in L1 (data read once).
__device__ __forceinline__ vec16 ld16_stream(const void* p) {
    vec16 v; asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p)); return v;
}
__device__ __forceinline__ void st16(void* p, const vec16& v) {
    asm volatile("st.global.v4.u32 [%0], {%1,%2,%3,%4};" :: "l"(p), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
}
__device__ __forceinline__ void st8(void* p, u32 a, u32 b) {
    asm volatile("st.global.v2.u32 [%0], {%1,%2};" :: "l"(p), "r"(a), "r"(b) : "memory");
}

// ---- reductions -----------------------------------------------------------
// Butterfly over WIDTH consecutive lanes (a power of two <= 32): every lane gets the result.
template <int WIDTH> __device__ __forceinline__ float group_max(float v) {
    #pragma unroll
    for (int o = WIDTH / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
template <int WIDTH> __device__ __forceinline__ float group_sum(float v) {
    #pragma unroll
    for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- math -------------------------------------------------------------------
// Programmatic dependent launch (runtime.Launcher(..., pdl=True)): such a kernel may start while the
// previous kernel of the stream is still running; pdl_wait() blocks until that kernel has completed
// and its writes are visible, so call it before touching any memory the previous kernel uses. A
// producer may call pdl_trigger() to let its dependant be scheduled early. No-ops before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float sigmoid_f32(float x) { return 1.0f / (1.0f + __expf(-x)); }

// ---- thread-block clusters (sm_90) ----------------------------------------
__device__ __forceinline__ u32 cluster_rank() { u32 r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r; }
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
// Read a float from the shared memory of CTA `rank` in this cluster, at the address of `local`.
__device__ __forceinline__ float cluster_ld_f32(const float* local, u32 rank) {
    u32 a = (u32)__cvta_generic_to_shared(local), ra; float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(ra) : "memory");
    return v;
}

// ---- vector loads into fp32 ---------------------------------------------------
// Load VEC consecutive elements of type E (aligned to VEC * E::BYTES) as fp32.
template <typename E, int VEC> __device__ __forceinline__ void load_f32(const void* p, float* out) {
    constexpr int BYTES = VEC * E::BYTES;
    if constexpr (BYTES >= 16) {
        #pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) Unpack<E>::run(ld16((const u8*)p + 16 * i), out + i * (16 / E::BYTES));
    } else if constexpr (BYTES == 8) {
        vec16 v; asm volatile("ld.global.v2.u32 {%0,%1}, [%2];" : "=r"(v.w[0]), "=r"(v.w[1]) : "l"(p));
        v.w[2] = v.w[3] = 0;
        float tmp[16 / E::BYTES];
        Unpack<E>::run(v, tmp);
        #pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = tmp[i];
    } else {
        #pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = E::load(((const typename E::T*)p)[i]);
    }
}

// ---- asynchronous global -> shared copies (sm_80+) ---------------------------
// 16 bytes; with `valid` false the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const u32 dst = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory");
}
__device__ __forceinline__ void st16_shared(void* smem, const vec16& v) {
    const u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" :: "r"(a), "r"(v.w[0]), "r"(v.w[1]), "r"(v.w[2]), "r"(v.w[3]) : "memory");
}

__device__ __forceinline__ vec16 ld16_shared(const void* smem) {
    vec16 v; const u32 a = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "r"(a));
    return v;
}
