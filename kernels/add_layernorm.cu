// Residual add + LayerNorm as one pass (src/ops/add_layernorm), one warp per
// row of [rows, cols]; used by the model only with --fused-add-layernorm on.
//
// Forward:   s = act(a + b)  (the residual stream, WRITTEN, rounded to act_t),
//            μ = Σs/C,  σ² = Σ(s−μ)²/C,  rstd = 1/√(σ²+ε),  y = (s−μ)·rstd·γ + β
//            (the statistics of the rounded s: what an unfused LayerNorm reading s sees)
// Backward:  with dn = dy·γ and x̂ = (s−μ)·rstd,
//            dx     += rstd · (dn − mean(dn) − x̂ · mean(dn·x̂))   (ADDS: dx holds the residual's gradient)
//            dbranch = dx                                          (WRITES: the gradient of b, equal to a's)
//            dγ, dβ: layernorm_backward_params of kernels/layernorm.cu (ADDS)
// a, b, s, y, dy, dx, dbranch are act_t (common.cuh); γ, β, μ, rstd fp32.
// Each lane reads back only the elements it wrote itself. Columns go in
// pairs (4- or 8-byte accesses) when cols is even, one by one otherwise.
#include "common.cuh"

__device__ __forceinline__ float2 load2(const float* p) { return *(const float2*)p; }
__device__ __forceinline__ float2 load2(const bf16* p) { return __bfloat1622float2(*(const __nv_bfloat162*)p); }
__device__ __forceinline__ void store2(float* p, float2 v) { *(float2*)p = v; }
__device__ __forceinline__ void store2(bf16* p, float2 v) { *(__nv_bfloat162*)p = __float22bfloat162_rn(v); }
// A pair as stored: each value rounded to act_t and read back.
__device__ __forceinline__ float2 rounded2(float2 v) { return make_float2(to_float(to_act(v.x)), to_float(to_act(v.y))); }

KERNEL(add_layernorm_forward)(act_t* s, act_t* y, float* mean, float* rstd, const act_t* a, const act_t* b,
                              const float* gamma, const float* beta, int rows, int cols, float eps) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned long long off = (unsigned long long)row * cols;
    bool pairs = cols % 2 == 0;
    float sum = 0.f;
    if (pairs) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 va = load2(a + off + c), vb = load2(b + off + c);
            float2 v = rounded2(make_float2(va.x + vb.x, va.y + vb.y));
            store2(s + off + c, v);
            sum += v.x + v.y;
        }
    } else {
        for (int c = lane; c < cols; c += WARP) {
            float v = to_float(to_act(to_float(a[off + c]) + to_float(b[off + c])));
            s[off + c] = to_act(v);
            sum += v;
        }
    }
    float mu = warp_sum(sum) / cols;
    float var = 0.f;
    if (pairs) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 v = load2(s + off + c);
            var += (v.x - mu) * (v.x - mu) + (v.y - mu) * (v.y - mu);
        }
    } else {
        for (int c = lane; c < cols; c += WARP) { float d = to_float(s[off + c]) - mu; var += d * d; }
    }
    float rs = rsqrtf(warp_sum(var) / cols + eps);
    if (pairs) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 v = load2(s + off + c);
            store2(y + off + c, make_float2((v.x - mu) * rs * gamma[c] + beta[c], (v.y - mu) * rs * gamma[c + 1] + beta[c + 1]));
        }
    } else {
        for (int c = lane; c < cols; c += WARP) y[off + c] = to_act((to_float(s[off + c]) - mu) * rs * gamma[c] + beta[c]);
    }
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

KERNEL(add_layernorm_backward_dx)(act_t* dx, act_t* dbranch, const act_t* dy, const act_t* s, const float* mean,
                                  const float* rstd, const float* gamma, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned long long off = (unsigned long long)row * cols;
    float mu = mean[row], rs = rstd[row];
    bool pairs = cols % 2 == 0;
    float ga = 0.f, gb = 0.f;
    if (pairs) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 d = load2(dy + off + c), x = load2(s + off + c);
            float dn0 = d.x * gamma[c], dn1 = d.y * gamma[c + 1];
            ga += dn0 + dn1;
            gb += dn0 * (x.x - mu) * rs + dn1 * (x.y - mu) * rs;
        }
    } else {
        for (int c = lane; c < cols; c += WARP) {
            float dn = to_float(dy[off + c]) * gamma[c];
            ga += dn;
            gb += dn * (to_float(s[off + c]) - mu) * rs;
        }
    }
    float mean_dn = warp_sum(ga) / cols, mean_dn_xhat = warp_sum(gb) / cols;
    if (pairs) {
        for (int c = 2 * lane; c < cols; c += 2 * WARP) {
            float2 d = load2(dy + off + c), x = load2(s + off + c), g = load2(dx + off + c);
            float xh0 = (x.x - mu) * rs, xh1 = (x.y - mu) * rs;
            g.x += rs * (d.x * gamma[c] - mean_dn - xh0 * mean_dn_xhat);
            g.y += rs * (d.y * gamma[c + 1] - mean_dn - xh1 * mean_dn_xhat);
            store2(dx + off + c, g);
            store2(dbranch + off + c, g);
        }
    } else {
        for (int c = lane; c < cols; c += WARP) {
            float xhat = (to_float(s[off + c]) - mu) * rs;
            float dn = to_float(dy[off + c]) * gamma[c];
            act_t g = to_act(to_float(dx[off + c]) + rs * (dn - mean_dn - xhat * mean_dn_xhat));
            dx[off + c] = g;
            dbranch[off + c] = g;
        }
    }
}
