// Residual connections (src/ops/add), elementwise over activations:
//
//   add_assign:  dst[i] += src[i]
//
// act_t storage (common.cuh), the sum in fp32, stored back rounded to act_t.
#include "common.cuh"

KERNEL(add_assign)(act_t* dst, const act_t* src, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = to_act(to_float(dst[i]) + to_float(src[i]));
}
