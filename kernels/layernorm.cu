// LayerNorm over the last axis, forward and backward (one warp per row).
//
// Forward (two passes over the row, fp32):
//   μ = Σx/C,  σ² = Σ(x−μ)²/C,  rstd = 1/√(σ²+ε),  x̂ = (x−μ)·rstd,  out = x̂·γ + β
// Backward, with dn = dout·γ:
//   dx     += rstd · (dn − mean(dn) − x̂ · mean(dn·x̂))        (ADDS)
//   dγ[c]  += Σ_r dout[r,c] · x̂[r,c],   dβ[c] += Σ_r dout[r,c]  (ADDS; block partials + atomicAdd)
// x, out, dout, dx are act_t (common.cuh); γ, β, their gradients, μ and rstd fp32.
#include "common.cuh"

KERNEL(layernorm_forward)(act_t* out, float* mean, float* rstd, const act_t* x,
                                             const float* gamma, const float* beta, int rows, int cols, float eps) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const act_t* xr = x + (unsigned long long)row * cols;
    float s = 0.f;
    for (int c = lane; c < cols; c += WARP) s += to_float(xr[c]);
    float mu = warp_sum(s) / cols;
    float v = 0.f;
    for (int c = lane; c < cols; c += WARP) { float d = to_float(xr[c]) - mu; v += d * d; }
    float rs = rsqrtf(warp_sum(v) / cols + eps);
    act_t* o = out + (unsigned long long)row * cols;
    for (int c = lane; c < cols; c += WARP) o[c] = to_act((to_float(xr[c]) - mu) * rs * gamma[c] + beta[c]);
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

// Two adjacent columns per lane per step (one 4-byte bf16 pair or 8-byte
// float pair) when cols is even, so a warp touches 128 contiguous bytes or
// more per access; a scalar loop otherwise.
__device__ __forceinline__ float2 load_pair(const float* p) { return *(const float2*)p; }
__device__ __forceinline__ float2 load_pair(const bf16* p) { return __bfloat1622float2(*(const __nv_bfloat162*)p); }
__device__ __forceinline__ void store_pair(float* p, float2 v) { *(float2*)p = v; }
__device__ __forceinline__ void store_pair(bf16* p, float2 v) { *(__nv_bfloat162*)p = __float22bfloat162_rn(v); }

KERNEL(layernorm_backward_dx)(act_t* dx, const act_t* dout, const act_t* x, const float* mean,
                              const float* rstd, const float* gamma, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned long long off = (unsigned long long)row * cols;
    float mu = mean[row], rs = rstd[row];
    float a = 0.f, b = 0.f;
    if (cols % 2 == 0) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 d = load_pair(dout + off + c), xv = load_pair(x + off + c);
            float dn0 = d.x * gamma[c], dn1 = d.y * gamma[c + 1];
            a += dn0 + dn1;
            b += dn0 * (xv.x - mu) * rs + dn1 * (xv.y - mu) * rs;
        }
    } else {
        for (int c = lane; c < cols; c += WARP) {
            float dn = to_float(dout[off + c]) * gamma[c];
            a += dn;
            b += dn * (to_float(x[off + c]) - mu) * rs;
        }
    }
    float mean_dn = warp_sum(a) / cols, mean_dn_xhat = warp_sum(b) / cols;
    if (cols % 2 == 0) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 d = load_pair(dout + off + c), xv = load_pair(x + off + c), g = load_pair(dx + off + c);
            float dn0 = d.x * gamma[c], dn1 = d.y * gamma[c + 1];
            float xh0 = (xv.x - mu) * rs, xh1 = (xv.y - mu) * rs;
            g.x += rs * (dn0 - mean_dn - xh0 * mean_dn_xhat);
            g.y += rs * (dn1 - mean_dn - xh1 * mean_dn_xhat);
            store_pair(dx + off + c, g);
        }
    } else {
        for (int c = lane; c < cols; c += WARP) {
            float xhat = (to_float(x[off + c]) - mu) * rs;
            float dn = to_float(dout[off + c]) * gamma[c];
            dx[off + c] = to_act(to_float(dx[off + c]) + rs * (dn - mean_dn - xhat * mean_dn_xhat));
        }
    }
}

// Block (32, 8), grid (ceil(cols/32), row chunks), as bias_backward.
KERNEL(layernorm_backward_params)(float* dgamma, float* dbeta, const act_t* dout, const act_t* x,
                                                     const float* mean, const float* rstd, int rows, int cols,
                                                     int rows_per_block) {
    __shared__ float pg[8][33], pb[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_block;
    int r1 = min(rows, r0 + rows_per_block);
    float ag = 0.f, ab = 0.f;
    if (col < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            unsigned long long i = (unsigned long long)r * cols + col;
            float g = to_float(dout[i]);
            ag += g * (to_float(x[i]) - mean[r]) * rstd[r];
            ab += g;
        }
    pg[threadIdx.y][threadIdx.x] = ag;
    pb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float sg = 0.f, sb = 0.f;
        for (int k = 0; k < 8; k++) { sg += pg[k][threadIdx.x]; sb += pb[k][threadIdx.x]; }
        atomicAdd(&dgamma[col], sg);
        atomicAdd(&dbeta[col], sb);
    }
}
