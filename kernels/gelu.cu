// Exact GELU (src/ops/gelu), elementwise:
//
//   gelu_forward:   out = x/2 · (1 + erf(x/√2))
//   gelu_backward:  dx = dout · (½(1 + erf(x/√2)) + x · φ(x)),  φ(x) = e^{−x²/2}/√(2π)
//
// act_t storage (common.cuh); math in fp32.
#include "common.cuh"

#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT_2PI 0.3989422804014327f

KERNEL(gelu_forward)(act_t* out, const act_t* x, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = to_float(x[i]);
        out[i] = to_act(0.5f * v * (1.f + erff(v * INV_SQRT2)));
    }
}

KERNEL(gelu_backward)(act_t* dx, const act_t* x, const act_t* dout, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = to_float(x[i]);
        float g = 0.5f * (1.f + erff(v * INV_SQRT2)) + v * INV_SQRT_2PI * expf(-0.5f * v * v);
        dx[i] = to_act(to_float(dout[i]) * g);
    }
}
