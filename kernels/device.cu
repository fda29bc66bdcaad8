// The device layer's own kernel (src/device/cuda.rs), not an op:
//
//   convert_f32_to_bf16:  dst[i] = bf16(src[i])   (round to nearest even)
//
// It refreshes the bf16 copy of an fp32 weight before a bf16 matrix product
// and copies an fp32 buffer into a bf16 one.
#include "common.cuh"

KERNEL(convert_f32_to_bf16)(bf16* dst, const float* src, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = __float2bfloat16_rn(src[i]);
}
