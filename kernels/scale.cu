// LayerScale and the scalar scale (src/ops/scale):
//
//   scale_rows:            y[r, c] = x[r, c] · gamma[c]   (the forward, and dx = dy · gamma)
//   scale_backward_gamma:  dgamma[c] += Σ_r dy[r, c] · x[r, c]   (ADDS; block partial sums + atomicAdd)
//   scale_by:              x[i] *= alpha
//
// Activations are act_t (common.cuh); gamma and its gradient fp32; math in fp32.
#include "common.cuh"

KERNEL(scale_rows)(act_t* y, const act_t* x, const float* gamma, int rows, int cols) {
    unsigned long long n = (unsigned long long)rows * cols;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) y[i] = to_act(to_float(x[i]) * gamma[i % cols]);
}

// Column sums of dy ∘ x, as bias_backward (matmul.cu) sums dy: block (32, 8),
// 32 columns and 8 row lanes; grid (ceil(cols/32), row chunks); one atomic
// per column and block.
KERNEL(scale_backward_gamma)(float* dgamma, const act_t* dy, const act_t* x, int rows, int cols,
                             int rows_per_block) {
    __shared__ float part[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float acc = 0.f;
    if (col < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            unsigned long long i = (unsigned long long)r * cols + col;
            acc += to_float(dy[i]) * to_float(x[i]);
        }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float s = 0.f;
        for (int k = 0; k < 8; k++) s += part[k][threadIdx.x];
        atomicAdd(&dgamma[col], s);
    }
}

KERNEL(scale_by)(act_t* x, float alpha, unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    for (; i < n; i += (unsigned long long)gridDim.x * blockDim.x) x[i] = to_act(to_float(x[i]) * alpha);
}
