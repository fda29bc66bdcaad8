// Fused multi-head attention for short sequences (ViT: T ≤ 256 tokens,
// head_dim ≤ 128), forward and backward. One block per (image, head), 8
// warps; the block's K and V (forward) or K,V then Q,dO (backward) live in
// shared memory with rows padded to dh+1 floats (no bank conflicts).
//
// Forward, per row i (one warp):       S_ij = q_i·k_j / √dh,  P_i = softmax(S_i),  o_i = Σ_j P_ij v_j
// Backward, phase 1, per row i:        dP_ij = do_i·v_j,  D_i = Σ_j P_ij dP_ij,
//                                      dS_ij = P_ij (dP_ij − D_i),  dq_i = Σ_j dS_ij k_j / √dh
// Backward, phase 2, per column j:     dv_j = Σ_i P_ij do_i,  dk_j = Σ_i dS_ij q_i / √dh
//   (dS recomputed from P, do, v and the D_i kept in shared memory).
// Everything is WRITTEN (no accumulation). Global tensors are act_t
// (common.cuh); shared memory and all arithmetic are fp32.
// Also: softmax_rows, the softmax of the unfused (cuBLAS) fallback path, and
// softmax_rows_backward: dS = P ∘ (dP − rowsum(dP ∘ P)) in place on dP.
#include "common.cuh"

#define ATT_WARPS 8

// Copy rows [T, dh] of one head (row stride D in global) into shared [T][dh+1].
__device__ void load_head(float* dst, const act_t* src, int T, int dh, int D) {
    for (int idx = threadIdx.x; idx < T * dh; idx += blockDim.x) {
        int r = idx / dh, c = idx % dh;
        dst[r * (dh + 1) + c] = to_float(src[(unsigned long long)r * D + c]);
    }
}

KERNEL(attention_forward)(act_t* out, act_t* probs, const act_t* q, const act_t* k, const act_t* v,
                                             int T, int heads, int dh) {
    extern __shared__ float smem[];
    int bh = blockIdx.x, b = bh / heads, h = bh % heads;
    int D = heads * dh, ld = dh + 1;
    unsigned long long base = (unsigned long long)b * T * D + h * dh;
    float* ks = smem;
    float* vs = ks + T * ld;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float* qrow = vs + T * ld + warp * (dh + T);
    float* prow = qrow + dh;
    load_head(ks, k + base, T, dh, D);
    load_head(vs, v + base, T, dh, D);
    __syncthreads();
    float scale = rsqrtf((float)dh);
    act_t* pout = probs + (unsigned long long)bh * T * T;
    for (int i = warp; i < T; i += ATT_WARPS) {
        for (int d = lane; d < dh; d += WARP) qrow[d] = to_float(q[base + (unsigned long long)i * D + d]);
        __syncwarp();
        float m = -INFINITY;
        for (int j = lane; j < T; j += WARP) {
            float s = 0.f;
            for (int d = 0; d < dh; d++) s += qrow[d] * ks[j * ld + d];
            s *= scale;
            prow[j] = s;
            m = fmaxf(m, s);
        }
        m = warp_max(m);
        float sum = 0.f;
        for (int j = lane; j < T; j += WARP) {
            float e = expf(prow[j] - m);
            prow[j] = e;
            sum += e;
        }
        float inv = 1.f / warp_sum(sum);
        for (int j = lane; j < T; j += WARP) {
            float p = prow[j] * inv;
            prow[j] = p;
            pout[(unsigned long long)i * T + j] = to_act(p);
        }
        __syncwarp();
        for (int d = lane; d < dh; d += WARP) {
            float o = 0.f;
            for (int j = 0; j < T; j++) o += prow[j] * vs[j * ld + d];
            out[base + (unsigned long long)i * D + d] = to_act(o);
        }
        __syncwarp();
    }
}

KERNEL(attention_backward)(act_t* dq, act_t* dk, act_t* dv, const act_t* dout, const act_t* q,
                                              const act_t* k, const act_t* v, const act_t* probs, int T, int heads,
                                              int dh) {
    extern __shared__ float smem[];
    int bh = blockIdx.x, b = bh / heads, h = bh % heads;
    int D = heads * dh, ld = dh + 1;
    unsigned long long base = (unsigned long long)b * T * D + h * dh;
    float* big0 = smem;            // phase 1: K,  phase 2: Q
    float* big1 = big0 + T * ld;   // phase 1: V,  phase 2: dO
    float* dsum = big1 + T * ld;   // D_i
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float* vec = dsum + T + warp * (dh + 2 * T);  // do_i (phase 1) or v_j (phase 2)
    float* buf0 = vec + dh;                        // dS row (phase 1) or P column (phase 2)
    float* buf1 = buf0 + T;                        // dS column (phase 2)
    const act_t* p = probs + (unsigned long long)bh * T * T;
    float scale = rsqrtf((float)dh);

    load_head(big0, k + base, T, dh, D);
    load_head(big1, v + base, T, dh, D);
    __syncthreads();
    for (int i = warp; i < T; i += ATT_WARPS) {
        for (int d = lane; d < dh; d += WARP) vec[d] = to_float(dout[base + (unsigned long long)i * D + d]);
        __syncwarp();
        float acc = 0.f;
        for (int j = lane; j < T; j += WARP) {
            float dp = 0.f;
            for (int d = 0; d < dh; d++) dp += vec[d] * big1[j * ld + d];
            buf0[j] = dp;
            acc += dp * to_float(p[(unsigned long long)i * T + j]);
        }
        float di = warp_sum(acc);
        if (lane == 0) dsum[i] = di;
        for (int j = lane; j < T; j += WARP) buf0[j] = to_float(p[(unsigned long long)i * T + j]) * (buf0[j] - di);
        __syncwarp();
        for (int d = lane; d < dh; d += WARP) {
            float g = 0.f;
            for (int j = 0; j < T; j++) g += buf0[j] * big0[j * ld + d];
            dq[base + (unsigned long long)i * D + d] = to_act(g * scale);
        }
        __syncwarp();
    }
    __syncthreads();
    load_head(big0, q + base, T, dh, D);
    load_head(big1, dout + base, T, dh, D);
    __syncthreads();
    for (int j = warp; j < T; j += ATT_WARPS) {
        for (int d = lane; d < dh; d += WARP) vec[d] = to_float(v[base + (unsigned long long)j * D + d]);
        __syncwarp();
        for (int i = lane; i < T; i += WARP) {
            float dp = 0.f;
            for (int d = 0; d < dh; d++) dp += big1[i * ld + d] * vec[d];
            float pij = to_float(p[(unsigned long long)i * T + j]);
            buf0[i] = pij;
            buf1[i] = pij * (dp - dsum[i]);
        }
        __syncwarp();
        for (int d = lane; d < dh; d += WARP) {
            float gv = 0.f, gk = 0.f;
            for (int i = 0; i < T; i++) {
                gv += buf0[i] * big1[i * ld + d];
                gk += buf1[i] * big0[i * ld + d];
            }
            dv[base + (unsigned long long)j * D + d] = to_act(gv);
            dk[base + (unsigned long long)j * D + d] = to_act(gk * scale);
        }
        __syncwarp();
    }
}

// Row softmax in place, one warp per row (fallback path and benchmark baseline).
KERNEL(softmax_rows)(act_t* x, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    act_t* r = x + (unsigned long long)row * cols;
    float m = -INFINITY;
    for (int j = lane; j < cols; j += WARP) m = fmaxf(m, to_float(r[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int j = lane; j < cols; j += WARP) s += expf(to_float(r[j]) - m);
    float inv = 1.f / warp_sum(s);
    // exp recomputed from the stored scores: rounding e to act_t before the
    // division would round twice.
    for (int j = lane; j < cols; j += WARP) r[j] = to_act(expf(to_float(r[j]) - m) * inv);
}

// dS = P ∘ (dP − rowsum(dP ∘ P)), in place on dP, one warp per row.
KERNEL(softmax_rows_backward)(act_t* dp, const act_t* p, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    unsigned long long off = (unsigned long long)row * cols;
    float dot = 0.f;
    for (int j = lane; j < cols; j += WARP) dot += to_float(dp[off + j]) * to_float(p[off + j]);
    dot = warp_sum(dot);
    for (int j = lane; j < cols; j += WARP) dp[off + j] = to_act(to_float(p[off + j]) * (to_float(dp[off + j]) - dot));
}
