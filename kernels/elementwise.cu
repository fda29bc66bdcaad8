// Elementwise kernels and the bias of dense layers, forward and backward.
//
//   add_assign:      dst[i] += src[i]
//   broadcast_rows:  y[r, c] = bias[c]                 (linear forward, before y += x Wᵀ)
//   bias_backward:   dbias[c] += Σ_r dy[r, c]          (ADDS; block partial sums + atomicAdd)
//   gelu_forward:    out = x/2 · (1 + erf(x/√2))       (exact GELU)
//   gelu_backward:   dx = dout · (½(1 + erf(x/√2)) + x · φ(x)),  φ(x) = e^{−x²/2}/√(2π)
#include "common.cuh"

extern "C" __global__ void add_assign(float* dst, const float* src, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) dst[i] += src[i];
}

extern "C" __global__ void broadcast_rows(float* y, const float* bias, int rows, int cols) {
    unsigned long long n = (unsigned long long)rows * cols;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) y[i] = bias[i % cols];
}

// Column sums of dy[rows, cols] ADDED to dbias. Block (32, 8): 32 columns,
// 8 row lanes; grid (ceil(cols/32), row chunks). Each block reduces its
// chunk in shared memory and adds one atomic per column.
extern "C" __global__ void bias_backward(float* dbias, const float* dy, int rows, int cols, int rows_per_block) {
    __shared__ float part[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float acc = 0.f;
    if (col < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) acc += dy[(unsigned long long)r * cols + col];
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

extern "C" __global__ void gelu_forward(float* out, const float* x, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = x[i];
        out[i] = 0.5f * v * (1.f + erff(v * INV_SQRT2));
    }
}

extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dout, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float g = 0.5f * (1.f + erff(v * INV_SQRT2)) + v * INV_SQRT_2PI * expf(-0.5f * v * v);
        dx[i] = dout[i] * g;
    }
}
