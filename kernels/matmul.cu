// The bias of dense layers (src/ops/matmul; the products themselves are cuBLAS):
//
//   broadcast_rows:  y[r, c] = bias[c]          (linear forward, before y += x Wᵀ)
//   bias_backward:   dbias[c] += Σ_r dy[r, c]   (ADDS; block partial sums + atomicAdd)
//
// Activations are act_t (common.cuh); bias and its gradient fp32; math in fp32.
#include "common.cuh"

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
