// The MLP's activations (src/ops/gelu), elementwise; `act` picks the form,
// numbered as src/ops/gelu/cuda.rs numbers `Activation`:
//
//   ACT_GELU        out = x/2 · (1 + erf(x/√2))
//                   dx  = dout · (½(1 + erf(x/√2)) + x · φ(x)),  φ(x) = e^{−x²/2}/√(2π)
//   ACT_GELU_TANH   out = x · σ(2u),  u = √(2/π)(x + 0.044715 x³)   (= x/2 · (1 + tanh u))
//                   dx  = dout · (s + x · s(1 − s) · 2u'),  s = σ(2u)
//   ACT_QUICK_GELU  out = x · σ(1.702 x)
//                   dx  = dout · (s + 1.702 x · s(1 − s)),  s = σ(1.702 x)
//
// act_t storage (common.cuh); math in fp32. `act` is the same for every
// thread, so the switch does not diverge.
#include "common.cuh"

#define ACT_GELU 0
#define ACT_GELU_TANH 1
#define ACT_QUICK_GELU 2

#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT_2PI 0.3989422804014327f
#define TWO_SQRT_2_OVER_PI 1.5957691216057308f
#define TANH_CUBIC 0.044715f
#define QUICK 1.702f

// σ(z); expf(−z) overflows to +inf below z ≈ −88, where σ is then 0.
__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

__device__ __forceinline__ float activation(float v, int act) {
    switch (act) {
    case ACT_GELU_TANH:
        return v * sigmoid(TWO_SQRT_2_OVER_PI * v * (1.f + TANH_CUBIC * v * v));
    case ACT_QUICK_GELU:
        return v * sigmoid(QUICK * v);
    default:
        return 0.5f * v * (1.f + erff(v * INV_SQRT2));
    }
}

__device__ __forceinline__ float activation_grad(float v, int act) {
    switch (act) {
    case ACT_GELU_TANH: {
        float s = sigmoid(TWO_SQRT_2_OVER_PI * v * (1.f + TANH_CUBIC * v * v));
        return s + v * s * (1.f - s) * TWO_SQRT_2_OVER_PI * (1.f + 3.f * TANH_CUBIC * v * v);
    }
    case ACT_QUICK_GELU: {
        float s = sigmoid(QUICK * v);
        return s + QUICK * v * s * (1.f - s);
    }
    default:
        return 0.5f * (1.f + erff(v * INV_SQRT2)) + v * INV_SQRT_2PI * expf(-0.5f * v * v);
    }
}

KERNEL(gelu_forward)(act_t* out, const act_t* x, unsigned long long n, int act) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) out[i] = to_act(activation(to_float(x[i]), act));
}

KERNEL(gelu_backward)(act_t* dx, const act_t* x, const act_t* dout, unsigned long long n, int act) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        dx[i] = to_act(to_float(dout[i]) * activation_grad(to_float(x[i]), act));
}
