// Elementwise kernels and the bias of dense layers, forward and backward.
//
//   add_assign:      dst[i] += src[i]
//   broadcast_rows:  y[r, c] = bias[c]                 (linear forward, before y += x Wᵀ)
//   bias_backward:   dbias[c] += Σ_r dy[r, c]          (ADDS; block partial sums + atomicAdd)
//   gelu_forward:    out = x/2 · (1 + erf(x/√2))       (exact GELU)
//   gelu_backward:   dx = dout · (½(1 + erf(x/√2)) + x · φ(x)),  φ(x) = e^{−x²/2}/√(2π)
//   convert_f32_to_bf16: dst[i] = bf16(src[i])      (refreshes a weight's bf16 copy)
// Activations are act_t (common.cuh); bias and its gradient fp32; math in fp32.
#include "common.cuh"

KERNEL(convert_f32_to_bf16)(bf16* dst, const float* src, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = __float2bfloat16_rn(src[i]);
}

KERNEL(add_assign)(act_t* dst, const act_t* src, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) dst[i] = to_act(to_float(dst[i]) + to_float(src[i]));
}

KERNEL(broadcast_rows)(act_t* y, const float* bias, int rows, int cols) {
    unsigned long long n = (unsigned long long)rows * cols;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) y[i] = to_act(bias[i % cols]);
}

// Column sums of dy[rows, cols] ADDED to dbias. Block (32, 8): 32 columns,
// 8 row lanes; grid (ceil(cols/32), row chunks). Each block reduces its
// chunk in shared memory and adds one atomic per column.
KERNEL(bias_backward)(float* dbias, const act_t* dy, int rows, int cols, int rows_per_block) {
    __shared__ float part[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float acc = 0.f;
    if (col < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += to_float(dy[(unsigned long long)r * cols + col]);
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float s = 0.f;
        for (int k = 0; k < 8; k++) s += part[k][threadIdx.x];
        atomicAdd(&dbias[col], s);
    }
}

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
