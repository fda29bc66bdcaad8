// Global gradient norm and the fused AdamW step.
//
//   sum_squares:  acc[0] += Σ x[i]²   (fp64 per thread and per block, one atomicAdd per block)
//   adamw_update: s = clip ? min(1, c/√gn²) : 1   (gn² read on the device: no host sync)
//                 g = s·grad;  m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²
//                 p −= lr (wd·p + (m/bc1) / (√(v/bc2) + ε)),   bc1 = 1−β1^t, bc2 = 1−β2^t
//                 shadow[i] = bf16(p) when `shadow` is not null: the bf16 copy of
//                 the weight that matrix products read in bf16 mode, rewritten in
//                 the same pass instead of a second one.
// Everything here is fp32 (master weights, gradients, moments).
#include "common.cuh"

KERNEL(sum_squares)(float* acc, const float* x, unsigned long long n) {
    __shared__ double scratch[32];
    double s = 0.0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        double v = x[i];
        s += v * v;
    }
    double total = block_sum_d(s, scratch);
    if (threadIdx.x == 0) atomicAdd(acc, (float)total);
}

KERNEL(adamw_update)(float* param, const float* grad, float* m, float* v, const float* grad_norm_sq,
                                        unsigned long long n, float lr, float b1, float b2, float eps, float wd,
                                        float bc1, float bc2, int clip, float max_norm, bf16* shadow) {
    float scale = 1.f;
    float gn2 = grad_norm_sq[0];
    if (clip && gn2 > 0.f) scale = fminf(max_norm / sqrtf(gn2), 1.f);
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float g = grad[i] * scale;
        float mi = b1 * m[i] + (1.f - b1) * g;
        float vi = b2 * v[i] + (1.f - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        float update = (mi / bc1) / (sqrtf(vi / bc2) + eps);
        float p = param[i] - lr * (wd * param[i] + update);
        param[i] = p;
        if (shadow) shadow[i] = __float2bfloat16_rn(p);
    }
}
