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
//
// Short sequences (T ≤ 64, dh a multiple of 16 up to 128; ViT-B/32 has T =
// 50): attention_short_forward and attention_short_backward, off by default
// (--short-attention on). One block of 4 warps per (image, head);
// every operand of the head lives in shared memory, zero-padded to TP = T
// rounded up to 16 rows and columns, so every product runs on whole 16×16
// tiles and the padding contributes exact zeros:
//   Q, K, V, dO: act_t [TP][dh + 8]     P, dS: act_t [TP][TP + 8]
//   F: fp32 [TP][max(TP, dh) + 4], the scores and dP, and the staging tile of each output
// Forward:   S = Q Kᵀ (F),  P = softmax(S / √dh) per row in fp32 (P, and probs),  O = P V (F → out)
// Backward:  dV = Pᵀ dO,  dP = dO Vᵀ (F),  D_i = Σ_j P_ij dP_ij,  dS = P ∘ (dP − D),
//            dQ = dS K / √dh,  dK = dSᵀ Q / √dh
// Products (block_mm): bf16 operands on tensor cores (WMMA 16×16×16, fp32
// accumulation) in the bf16 build, fp32 SIMT loops in the fp32 build. P and
// dS are rounded to act_t before the products that read them (P as the
// probs the backward reads, so forward and backward see the same P).
// Shared bytes: forward  (3·TP·(dh+8) + TP·(TP+8))·sizeof(act_t) + 4·TP·(max(TP,dh)+4)
//               backward (4·TP·(dh+8) + 2·TP·(TP+8))·sizeof(act_t) + 4·TP·(max(TP,dh)+4)
#include "common.cuh"
#ifdef EFFRANK_ACT_BF16
#include <mma.h>
using namespace nvcuda;
#endif

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

// ---- Short sequences (see the header) -------------------------------------

#define SHORT_WARPS 4

template <bool C, class T, class F> struct pick { typedef T type; };
template <class T, class F> struct pick<false, T, F> { typedef F type; };

// C[M×N] (fp32, row stride ldc) = op(A) · op(B) over K, every thread of the
// block taking part, with op(A)[m][k] = TA ? a[k·lda + m] : a[m·lda + k] and
// op(B)[k][n] = TB ? b[n·ldb + k] : b[k·ldb + n]. M, N, K are multiples of
// 16; operands and C start on 32-byte boundaries and their row strides are
// multiples of 8 elements (WMMA's rules).
template <bool TA, bool TB>
__device__ void block_mm(float* c, int ldc, const act_t* a, int lda, const act_t* b, int ldb, int M, int N, int K) {
#ifdef EFFRANK_ACT_BF16
    const int warp = threadIdx.x / WARP, nt = N / 16, tiles = (M / 16) * nt;
    for (int t = warp; t < tiles; t += SHORT_WARPS) {
        const int m0 = (t / nt) * 16, n0 = (t % nt) * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int k0 = 0; k0 < K; k0 += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, typename pick<TA, wmma::col_major, wmma::row_major>::type> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, typename pick<TB, wmma::col_major, wmma::row_major>::type> fb;
            wmma::load_matrix_sync(fa, TA ? a + k0 * lda + m0 : a + m0 * lda + k0, lda);
            wmma::load_matrix_sync(fb, TB ? b + n0 * ldb + k0 : b + k0 * ldb + n0, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(c + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
    }
#else
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
        const int m = idx / N, n = idx % N;
        float s = 0.f;
        for (int k = 0; k < K; k++) s = fmaf(TA ? a[k * lda + m] : a[m * lda + k], TB ? b[n * ldb + k] : b[k * ldb + n], s);
        c[m * ldc + n] = s;
    }
#endif
}

// dst[TP][ld] = rows [0, T) of one head (row stride D), zero rows [T, TP);
// 16-byte copies (dh a multiple of 16 and D of 8 keep every row aligned).
__device__ void load_head_tile(act_t* dst, int ld, const act_t* src, int T, int TP, int dh, int D) {
    const int vec = 16 / sizeof(act_t), per_row = dh / vec;
    for (int idx = threadIdx.x; idx < TP * per_row; idx += blockDim.x) {
        const int r = idx / per_row, c = (idx % per_row) * vec;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < T) v = *(const uint4*)(src + (unsigned long long)r * D + c);
        *(uint4*)(dst + r * ld + c) = v;
    }
}

// Rows [0, T), columns [0, dh) of the fp32 tile, times scale, into one head
// of dst (row stride D).
__device__ void store_head_tile(act_t* dst, const float* src, int ld, float scale, int T, int dh, int D) {
    for (int idx = threadIdx.x; idx < T * dh; idx += blockDim.x) {
        const int r = idx / dh, c = idx % dh;
        dst[(unsigned long long)r * D + c] = to_act(src[r * ld + c] * scale);
    }
}

// Shared layout of the short kernels (see the header); every piece is a
// multiple of 32 bytes long, so each starts on a 32-byte boundary.
struct ShortLayout {
    int TP, ldh, ldp, ldf;
    __device__ ShortLayout(int T, int dh) : TP((T + 15) & ~15), ldh(dh + 8), ldp(((T + 15) & ~15) + 8), ldf(max((T + 15) & ~15, dh) + 4) {}
};

KERNEL_BOUNDS(attention_short_forward, 128)(act_t* out, act_t* probs, const act_t* q, const act_t* k, const act_t* v,
                                            int T, int heads, int dh) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const ShortLayout L(T, dh);
    act_t* qs = (act_t*)smem_raw;
    act_t* ks = qs + L.TP * L.ldh;
    act_t* vs = ks + L.TP * L.ldh;
    act_t* ps = vs + L.TP * L.ldh;
    float* f = (float*)(ps + L.TP * L.ldp);
    const int bh = blockIdx.x, b = bh / heads, h = bh % heads, D = heads * dh;
    const unsigned long long base = (unsigned long long)b * T * D + h * dh;
    act_t* pout = probs + (unsigned long long)bh * T * T;
    load_head_tile(qs, L.ldh, q + base, T, L.TP, dh, D);
    load_head_tile(ks, L.ldh, k + base, T, L.TP, dh, D);
    load_head_tile(vs, L.ldh, v + base, T, L.TP, dh, D);
    __syncthreads();
    block_mm<false, true>(f, L.ldf, qs, L.ldh, ks, L.ldh, L.TP, L.TP, dh);  // S = Q Kᵀ
    __syncthreads();
    // P = softmax(S / √dh), one warp per row, two columns per lane (TP ≤ 64).
    const float scale = rsqrtf((float)dh);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    for (int i = warp; i < L.TP; i += SHORT_WARPS) {
        const int j0 = lane, j1 = lane + WARP;
        const bool row = i < T, in0 = row && j0 < T, in1 = row && j1 < T;
        const float x0 = in0 ? f[i * L.ldf + j0] * scale : -INFINITY;
        const float x1 = in1 ? f[i * L.ldf + j1] * scale : -INFINITY;
        const float m = warp_max(fmaxf(x0, x1));
        const float e0 = in0 ? expf(x0 - m) : 0.f, e1 = in1 ? expf(x1 - m) : 0.f;
        const float sum = warp_sum(e0 + e1);
        const float inv = row ? 1.f / sum : 0.f;
        const act_t p0 = to_act(e0 * inv), p1 = to_act(e1 * inv);
        if (j0 < L.TP) ps[i * L.ldp + j0] = p0;
        if (j1 < L.TP) ps[i * L.ldp + j1] = p1;
        if (in0) pout[i * T + j0] = p0;
        if (in1) pout[i * T + j1] = p1;
    }
    __syncthreads();
    block_mm<false, false>(f, L.ldf, ps, L.ldp, vs, L.ldh, L.TP, dh, L.TP);  // O = P V
    __syncthreads();
    store_head_tile(out + base, f, L.ldf, 1.f, T, dh, D);
}

KERNEL_BOUNDS(attention_short_backward, 128)(act_t* dq, act_t* dk, act_t* dv, const act_t* dout, const act_t* q,
                                             const act_t* k, const act_t* v, const act_t* probs, int T, int heads,
                                             int dh) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const ShortLayout L(T, dh);
    act_t* qs = (act_t*)smem_raw;
    act_t* ks = qs + L.TP * L.ldh;
    act_t* vs = ks + L.TP * L.ldh;
    act_t* dos = vs + L.TP * L.ldh;
    act_t* ps = dos + L.TP * L.ldh;
    act_t* dss = ps + L.TP * L.ldp;
    float* f = (float*)(dss + L.TP * L.ldp);
    const int bh = blockIdx.x, b = bh / heads, h = bh % heads, D = heads * dh;
    const unsigned long long base = (unsigned long long)b * T * D + h * dh;
    const act_t* pin = probs + (unsigned long long)bh * T * T;
    const float scale = rsqrtf((float)dh);
    load_head_tile(qs, L.ldh, q + base, T, L.TP, dh, D);
    load_head_tile(ks, L.ldh, k + base, T, L.TP, dh, D);
    load_head_tile(vs, L.ldh, v + base, T, L.TP, dh, D);
    load_head_tile(dos, L.ldh, dout + base, T, L.TP, dh, D);
    for (int idx = threadIdx.x; idx < L.TP * L.TP; idx += blockDim.x) {
        const int i = idx / L.TP, j = idx % L.TP;
        ps[i * L.ldp + j] = (i < T && j < T) ? pin[i * T + j] : to_act(0.f);
    }
    __syncthreads();
    block_mm<true, false>(f, L.ldf, ps, L.ldp, dos, L.ldh, L.TP, dh, L.TP);  // dV = Pᵀ dO
    __syncthreads();
    store_head_tile(dv + base, f, L.ldf, 1.f, T, dh, D);
    __syncthreads();
    block_mm<false, true>(f, L.ldf, dos, L.ldh, vs, L.ldh, L.TP, L.TP, dh);  // dP = dO Vᵀ
    __syncthreads();
    // dS = P ∘ (dP − D), D_i = Σ_j P_ij dP_ij: one warp per row (padding: P = 0, so dS = 0).
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    for (int i = warp; i < L.TP; i += SHORT_WARPS) {
        const int j0 = lane, j1 = lane + WARP;
        const bool in0 = j0 < L.TP, in1 = j1 < L.TP;
        const float p0 = in0 ? to_float(ps[i * L.ldp + j0]) : 0.f, p1 = in1 ? to_float(ps[i * L.ldp + j1]) : 0.f;
        const float g0 = in0 ? f[i * L.ldf + j0] : 0.f, g1 = in1 ? f[i * L.ldf + j1] : 0.f;
        const float di = warp_sum(p0 * g0 + p1 * g1);
        if (in0) dss[i * L.ldp + j0] = to_act(p0 * (g0 - di));
        if (in1) dss[i * L.ldp + j1] = to_act(p1 * (g1 - di));
    }
    __syncthreads();
    block_mm<false, false>(f, L.ldf, dss, L.ldp, ks, L.ldh, L.TP, dh, L.TP);  // dQ = dS K
    __syncthreads();
    store_head_tile(dq + base, f, L.ldf, scale, T, dh, D);
    __syncthreads();
    block_mm<true, false>(f, L.ldf, dss, L.ldp, qs, L.ldh, L.TP, dh, L.TP);  // dK = dSᵀ Q
    __syncthreads();
    store_head_tile(dk + base, f, L.ldf, scale, T, dh, D);
}

// ---------------------------------------------------------------------------
// The class token's query alone (the training tail's last block,
// src/model/vit.rs): q, out, dq, dout: [B, D] (one row per image), probs:
// [B, heads, T]; k, v, dk, dv: [B, T, D]. One block of CLS_THREADS per
// (image, head); q (and do) and the row of scores in fp32 shared memory.
//   forward:   s_j = q·k_j / √dh (a warp per key),  P = softmax(s),  o = Σ_j P_j v_j
//   backward:  dP_j = do·v_j,  D = Σ_j P_j dP_j,  dS_j = P_j (dP_j − D),
//              dq = Σ_j dS_j k_j / √dh,  dk_j = dS_j q / √dh,  dv_j = P_j do
// Everything is WRITTEN (every row of dk and dv).
// Shared bytes: forward 4·(dh + T), backward 4·(2·dh + T).
// ---------------------------------------------------------------------------
#define CLS_THREADS 128

// out[j] = scale · (vec · row j) for j < T, the rows dh long at stride D; a warp per row.
__device__ void warp_row_dots(float* out, const float* vec, const act_t* rows, int T, int D, int dh, float scale) {
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    for (int j = warp; j < T; j += nw) {
        float s = 0.f;
        for (int c = lane; c < dh; c += WARP) s += vec[c] * to_float(rows[(unsigned long long)j * D + c]);
        s = warp_sum(s);
        if (lane == 0) out[j] = s * scale;
    }
}

KERNEL_BOUNDS(attention_cls_forward, CLS_THREADS)(act_t* out, act_t* probs, const act_t* q, const act_t* k,
                                                  const act_t* v, int T, int heads, int dh) {
    extern __shared__ float smem[];
    int bh = blockIdx.x, b = bh / heads, h = bh % heads;
    int D = heads * dh;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float* qs = smem;     // [dh]
    float* ps = qs + dh;  // [T]
    unsigned long long row = (unsigned long long)b * D + h * dh;
    unsigned long long keys = (unsigned long long)b * T * D + h * dh;
    for (int c = threadIdx.x; c < dh; c += blockDim.x) qs[c] = to_float(q[row + c]);
    __syncthreads();
    float scale = rsqrtf((float)dh);
    warp_row_dots(ps, qs, k + keys, T, D, dh, scale);
    __syncthreads();
    if (warp == 0) {
        float m = -INFINITY;
        for (int j = lane; j < T; j += WARP) m = fmaxf(m, ps[j]);
        m = warp_max(m);
        float sum = 0.f;
        for (int j = lane; j < T; j += WARP) {
            float e = expf(ps[j] - m);
            ps[j] = e;
            sum += e;
        }
        float inv = 1.f / warp_sum(sum);
        for (int j = lane; j < T; j += WARP) {
            float p = ps[j] * inv;
            ps[j] = p;
            probs[(unsigned long long)bh * T + j] = to_act(p);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        float o = 0.f;
        for (int j = 0; j < T; j++) o += ps[j] * to_float(v[keys + (unsigned long long)j * D + c]);
        out[row + c] = to_act(o);
    }
}

KERNEL_BOUNDS(attention_cls_backward, CLS_THREADS)(act_t* dq, act_t* dk, act_t* dv, const act_t* dout,
                                                   const act_t* q, const act_t* k, const act_t* v,
                                                   const act_t* probs, int T, int heads, int dh) {
    extern __shared__ float smem[];
    int bh = blockIdx.x, b = bh / heads, h = bh % heads;
    int D = heads * dh;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float* qs = smem;     // [dh]
    float* gs = qs + dh;  // do, [dh]
    float* ds = gs + dh;  // dP, then dS, [T]
    unsigned long long row = (unsigned long long)b * D + h * dh;
    unsigned long long keys = (unsigned long long)b * T * D + h * dh;
    const act_t* p = probs + (unsigned long long)bh * T;
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        qs[c] = to_float(q[row + c]);
        gs[c] = to_float(dout[row + c]);
    }
    __syncthreads();
    float scale = rsqrtf((float)dh);
    warp_row_dots(ds, gs, v + keys, T, D, dh, 1.f);
    __syncthreads();
    if (warp == 0) {
        float acc = 0.f;
        for (int j = lane; j < T; j += WARP) acc += to_float(p[j]) * ds[j];
        float total = warp_sum(acc);
        for (int j = lane; j < T; j += WARP) ds[j] = to_float(p[j]) * (ds[j] - total);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < T * dh; idx += blockDim.x) {
        int j = idx / dh, c = idx % dh;
        unsigned long long at = keys + (unsigned long long)j * D + c;
        dk[at] = to_act(ds[j] * qs[c] * scale);
        dv[at] = to_act(to_float(p[j]) * gs[c]);
    }
    for (int c = threadIdx.x; c < dh; c += blockDim.x) {
        float g = 0.f;
        for (int j = 0; j < T; j++) g += ds[j] * to_float(k[keys + (unsigned long long)j * D + c]);
        dq[row + c] = to_act(g * scale);
    }
}
