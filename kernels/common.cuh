// Shared helpers for every kernel file: the activation type, kernel naming,
// and warp and block reductions in fp32 and fp64.
//
// Precision. build.rs compiles every kernel file twice:
//   - without EFFRANK_ACT_BF16: act_t = float, kernel names end in `_f32`;
//   - with -DEFFRANK_ACT_BF16: act_t = __nv_bfloat16, names end in `_bf16`.
// act_t is the storage type of activations, their gradients and the weight
// copies that feed matrix products. Master weights, their gradients, the
// optimizer state, LayerNorm statistics and loss accumulators are always
// float. Arithmetic and accumulation are fp32 (fp64 where the CPU reference
// sums in f64: losses, norms); act_t is only ever loaded with `to_float` and
// stored with `to_act`.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

#ifdef EFFRANK_ACT_BF16
typedef bf16 act_t;
#define KSUFFIX _bf16
#else
typedef float act_t;
#define KSUFFIX _f32
#endif

#define KCAT2(a, b) a##b
#define KCAT(a, b) KCAT2(a, b)
// `KERNEL(name)(args) { ... }` declares the extern "C" kernel `name_f32` or
// `name_bf16`; KERNEL_BOUNDS adds __launch_bounds__(threads).
#define KERNEL(name) extern "C" __global__ void KCAT(name, KSUFFIX)
#define KERNEL_BOUNDS(name, threads) extern "C" __global__ void __launch_bounds__(threads) KCAT(name, KSUFFIX)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ act_t to_act(float v) {
#ifdef EFFRANK_ACT_BF16
    return __float2bfloat16_rn(v);
#else
    return v;
#endif
}

// NVRTC has no <math.h>: the IEEE constants by bit pattern.
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fffffff)
#define WARP 32
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `scratch` holds 32 doubles.
__device__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    for (int i = 0; i < nw; i++) total += scratch[i];
    return total;
}

// Maximum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int i = 0; i < nw; i++) m = fmaxf(m, scratch[i]);
    return m;
}
