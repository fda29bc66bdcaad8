// Fused low-rank linear layer, forward:
//   h[rows, r] = x[rows, inp] · V[r, inp]ᵀ          (written: the backward pass needs it)
//   y[rows, out] = h · U[out, r]ᵀ + b
// One block of 256 threads (8 warps) per 32 rows; the 32×r tile of h stays in
// shared memory between the two products, so h is never read back from
// global memory. r ≤ 256. Each thread owns a 4×8 register tile: rows
// warp + 8·i (i < 4), columns lane + 32·c (c < 8); operands are staged in
// shared memory 32 columns of the reduction axis at a time, padded to 33
// floats per row (no bank conflicts). fp32 FMA, fp32 accumulation.
// (The backward pass is two ordinary GEMMs per factor: dU = dyᵀ h,
// dh = dy U, dV = dhᵀ x, dx = dh V, run through cuBLAS.)
#include "common.cuh"

#define LR_BM 32
#define LR_BK 32
#define LR_BN 256
#define LR_MAX_RANK 256

// tile[n][kk] = w[(n0 + n) * ld + k0 + kk] for n < LR_BN rows (zero outside).
__device__ void load_tile(float* tile, const float* w, int n0, int n_total, int k0, int k_total, int ld) {
    for (int idx = threadIdx.x; idx < LR_BN * LR_BK; idx += blockDim.x) {
        int n = idx / LR_BK, kk = idx % LR_BK;
        int gn = n0 + n, gk = k0 + kk;
        tile[n * (LR_BK + 1) + kk] = (gn < n_total && gk < k_total) ? w[(unsigned long long)gn * ld + gk] : 0.f;
    }
}

extern "C" __global__ void __launch_bounds__(256) lowrank_forward(float* y, float* h, const float* x, const float* v,
                                                                  const float* u, const float* bias, int rows, int inp,
                                                                  int rank, int out) {
    extern __shared__ float smem[];
    int hld = rank + 1;
    float* hs = smem;                         // [LR_BM][rank + 1]
    float* xs = hs + LR_BM * hld;             // [LR_BM][LR_BK + 1]
    float* ws = xs + LR_BM * (LR_BK + 1);     // [LR_BN][LR_BK + 1]: V then U tiles
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int row0 = blockIdx.x * LR_BM;
    float acc[4][8];

    // h = x Vᵀ
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[i][c] = 0.f;
    for (int k0 = 0; k0 < inp; k0 += LR_BK) {
        for (int idx = threadIdx.x; idx < LR_BM * LR_BK; idx += blockDim.x) {
            int r = idx / LR_BK, kk = idx % LR_BK;
            int gr = row0 + r, gk = k0 + kk;
            xs[r * (LR_BK + 1) + kk] = (gr < rows && gk < inp) ? x[(unsigned long long)gr * inp + gk] : 0.f;
        }
        load_tile(ws, v, 0, rank, k0, inp, inp);
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < LR_BK; kk++) {
            float a[4], bv[8];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[(warp + 8 * i) * (LR_BK + 1) + kk];
#pragma unroll
            for (int c = 0; c < 8; c++) bv[c] = ws[(lane + 32 * c) * (LR_BK + 1) + kk];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int c = 0; c < 8; c++) acc[i][c] = fmaf(a[i], bv[c], acc[i][c]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int r = warp + 8 * i, gr = row0 + r;
#pragma unroll
        for (int c = 0; c < 8; c++) {
            int col = lane + 32 * c;
            if (col < rank) {
                hs[r * hld + col] = acc[i][c];
                if (gr < rows) h[(unsigned long long)gr * rank + col] = acc[i][c];
            }
        }
    }
    __syncthreads();

    // y = h Uᵀ + b, LR_BN output columns at a time
    for (int n0 = 0; n0 < out; n0 += LR_BN) {
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int c = 0; c < 8; c++) acc[i][c] = 0.f;
        for (int k0 = 0; k0 < rank; k0 += LR_BK) {
            load_tile(ws, u, n0, out, k0, rank, rank);
            __syncthreads();
            int kmax = min(LR_BK, rank - k0);
            for (int kk = 0; kk < kmax; kk++) {
                float a[4], bv[8];
#pragma unroll
                for (int i = 0; i < 4; i++) a[i] = hs[(warp + 8 * i) * hld + k0 + kk];
#pragma unroll
                for (int c = 0; c < 8; c++) bv[c] = ws[(lane + 32 * c) * (LR_BK + 1) + kk];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int c = 0; c < 8; c++) acc[i][c] = fmaf(a[i], bv[c], acc[i][c]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int gr = row0 + warp + 8 * i;
            if (gr >= rows) continue;
#pragma unroll
            for (int c = 0; c < 8; c++) {
                int col = n0 + lane + 32 * c;
                if (col < out) y[(unsigned long long)gr * out + col] = acc[i][c] + bias[col];
            }
        }
    }
}
