// Fused low-rank linear layer, forward:
//   h[rows, r] = x[rows, inp] · V[r, inp]ᵀ          (written: the backward pass needs it)
//   y[rows, out] = h · U[out, r]ᵀ + b
// The r-wide intermediate h stays in shared memory between the two products,
// so it is never read back from global memory; r ≤ 256. Two variants (see
// common.cuh): fp32 SIMT (the reference) and bf16 on tensor cores.
// (The backward pass is two ordinary GEMMs per factor: dU = dyᵀ h,
// dh = dy U, dV = dhᵀ x, dx = dh V, run through cuBLAS.)
#include "common.cuh"

#ifndef EFFRANK_ACT_BF16
// ---- fp32 variant: SIMT FMA ----------------------------------------------
//
// One block of 256 threads (8 warps) per 32 rows; the 32×r tile of h stays in
// shared memory between the two products, so h is never read back from
// global memory. r ≤ 256. Each thread owns a 4×8 register tile: rows
// warp + 8·i (i < 4), columns lane + 32·c (c < 8); operands are staged in
// shared memory 32 columns of the reduction axis at a time, padded to 33
// floats per row (no bank conflicts). x, h, y, V, U are act_t (common.cuh),
// staged as fp32 in shared memory; fp32 FMA, fp32 accumulation.
#define LR_BM 32
#define LR_BK 32
#define LR_BN 256
#define LR_MAX_RANK 256

// tile[n][kk] = w[(n0 + n) * ld + k0 + kk] for n < LR_BN rows (zero outside).
__device__ void load_tile(float* tile, const act_t* w, int n0, int n_total, int k0, int k_total, int ld) {
    for (int idx = threadIdx.x; idx < LR_BN * LR_BK; idx += blockDim.x) {
        int n = idx / LR_BK, kk = idx % LR_BK;
        int gn = n0 + n, gk = k0 + kk;
        tile[n * (LR_BK + 1) + kk] = (gn < n_total && gk < k_total) ? to_float(w[(unsigned long long)gn * ld + gk]) : 0.f;
    }
}

KERNEL_BOUNDS(lowrank_forward, 256)(act_t* y, act_t* h, const act_t* x, const act_t* v,
                                    const act_t* u, const float* bias, int rows, int inp,
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
            xs[r * (LR_BK + 1) + kk] = (gr < rows && gk < inp) ? to_float(x[(unsigned long long)gr * inp + gk]) : 0.f;
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
                if (gr < rows) h[(unsigned long long)gr * rank + col] = to_act(acc[i][c]);
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
                if (col < out) y[(unsigned long long)gr * out + col] = to_act(acc[i][c] + bias[col]);
            }
        }
    }
}

#else  // EFFRANK_ACT_BF16: tensor cores
// ---- bf16 variant: WMMA tensor cores (16×16×16 bf16 → fp32) -------------
//
// One block of 256 threads (8 warps) per 64 rows of x. R = rank rounded up
// to 16 (≤ 256); all tiles are zero-padded at every edge, so any shape works.
//   phase 1: h[64, R] = x[64, inp] · V[R, inp]ᵀ over k-chunks of 32: the
//            x chunk [64][32] and the V chunk [R][32] are staged in shared
//            memory (bf16, rows padded to 40 elements: 80-byte rows keep the
//            WMMA loads off one bank). Warp w owns row tile w%4 and the column
//            tiles of its half (w/4) of R: ≤ 8 fp32 accumulator fragments.
//            The fp32 result goes through a shared fp32 staging tile, is
//            rounded to bf16 into hs[64][R+8] (shared) and written to global h.
//   phase 2: for each chunk of 128 output columns, y[64, 128] = hs · U[128, R]ᵀ
//            over k-chunks of 32 (U chunk [128][32] staged like V); warp w owns
//            row tile w%4 and 4 column tiles; the result is staged in fp32,
//            bias added, rounded and stored with coalesced writes.
// Shared memory (bytes), R = round_up(rank, 16):
//   stage  = 4 · 64 · (max(R, 128) + 4)            fp32 staging (aliases nothing)
//   hs     = 2 · 64 · (R + 8)
//   tiles  = 2 · 40 · (64 + max(R, 128))           x/V chunk, then the U chunk
//   total  = stage + hs + tiles
#include <mma.h>
using namespace nvcuda;

#define TC_BM 64
#define TC_BK 32
#define TC_LDK 40      // padded row length (elements) of the k-chunk tiles
#define TC_BN 128

__device__ __forceinline__ int round16(int v) { return (v + 15) & ~15; }

// tile[r][kk] = src[(r0 + r) * ld + k0 + kk] for r < nrows, kk < TC_BK; zero
// outside [0, r_total) × [0, k_total). 16-byte loads when the row is aligned.
__device__ void load_chunk(bf16* tile, const bf16* src, int r0, int nrows, int r_total, int k0, int k_total, int ld) {
    const int vec = 8;  // bf16 per 16 bytes
    bool aligned = (ld % vec == 0) && ((((unsigned long long)src) & 15) == 0);
    for (int idx = threadIdx.x; idx < nrows * (TC_BK / vec); idx += blockDim.x) {
        int r = idx / (TC_BK / vec), kk = (idx % (TC_BK / vec)) * vec;
        int gr = r0 + r, gk = k0 + kk;
        bf16* dst = tile + r * TC_LDK + kk;
        if (gr < r_total && aligned && gk + vec <= k_total) {
            *(uint4*)dst = *(const uint4*)(src + (unsigned long long)gr * ld + gk);
        } else {
            for (int e = 0; e < vec; e++)
                dst[e] = (gr < r_total && gk + e < k_total) ? src[(unsigned long long)gr * ld + gk + e] : __float2bfloat16_rn(0.f);
        }
    }
}

KERNEL_BOUNDS(lowrank_forward, 256)(act_t* y, act_t* h, const act_t* x, const act_t* v, const act_t* u,
                                    const float* bias, int rows, int inp, int rank, int out) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int R = round16(rank);
    const int wide = R > TC_BN ? R : TC_BN;
    const int ld_stage = wide + 4;
    const int ld_h = R + 8;
    float* stage = (float*)smem_raw;                       // [64][ld_stage]
    bf16* hs = (bf16*)(stage + TC_BM * ld_stage);          // [64][ld_h]
    bf16* xs = hs + TC_BM * ld_h;                          // [64][TC_LDK]
    bf16* ws = xs + TC_BM * TC_LDK;                        // [wide][TC_LDK]: V chunk, then U chunk
    const int warp = threadIdx.x / WARP;
    const int row0 = blockIdx.x * TC_BM;
    const int rt = warp % 4;                               // this warp's row tile

    // ---- phase 1: h = x Vᵀ
    {
        const int ntiles = R / 16;
        const int half = (ntiles + 1) / 2;
        const int c_begin = (warp / 4) * half;
        const int c_end = min(ntiles, c_begin + half);
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[8];
#pragma unroll
        for (int j = 0; j < 8; j++) wmma::fill_fragment(acc[j], 0.f);
        for (int k0 = 0; k0 < inp; k0 += TC_BK) {
            load_chunk(xs, x, row0, TC_BM, rows, k0, inp, inp);
            load_chunk(ws, v, 0, R, rank, k0, inp, inp);
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < TC_BK; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                wmma::load_matrix_sync(a, xs + rt * 16 * TC_LDK + kk, TC_LDK);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    int ct = c_begin + j;
                    if (ct < c_end) {
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                        wmma::load_matrix_sync(b, ws + ct * 16 * TC_LDK + kk, TC_LDK);
                        wmma::mma_sync(acc[j], a, b, acc[j]);
                    }
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            int ct = c_begin + j;
            if (ct < c_end) wmma::store_matrix_sync(stage + rt * 16 * ld_stage + ct * 16, acc[j], ld_stage, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TC_BM * R; idx += blockDim.x) {
        int r = idx / R, c = idx % R;
        bf16 hv = __float2bfloat16_rn(stage[r * ld_stage + c]);
        hs[r * ld_h + c] = hv;
        int gr = row0 + r;
        if (gr < rows && c < rank) h[(unsigned long long)gr * rank + c] = hv;
    }
    __syncthreads();

    // ---- phase 2: y = h Uᵀ + b, 128 output columns at a time
    for (int n0 = 0; n0 < out; n0 += TC_BN) {
        const int c_begin = (warp / 4) * 4;  // 4 column tiles of 16 per warp
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4];
#pragma unroll
        for (int j = 0; j < 4; j++) wmma::fill_fragment(acc[j], 0.f);
        for (int k0 = 0; k0 < R; k0 += TC_BK) {
            load_chunk(ws, u, n0, TC_BN, out, k0, rank, rank);
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < TC_BK; kk += 16) {
                if (k0 + kk < R) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                    wmma::load_matrix_sync(a, hs + rt * 16 * ld_h + k0 + kk, ld_h);
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                        wmma::load_matrix_sync(b, ws + (c_begin + j) * 16 * TC_LDK + kk, TC_LDK);
                        wmma::mma_sync(acc[j], a, b, acc[j]);
                    }
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int j = 0; j < 4; j++) wmma::store_matrix_sync(stage + rt * 16 * ld_stage + (c_begin + j) * 16, acc[j], ld_stage, wmma::mem_row_major);
        __syncthreads();
        for (int idx = threadIdx.x; idx < TC_BM * TC_BN; idx += blockDim.x) {
            int r = idx / TC_BN, c = idx % TC_BN;
            int gr = row0 + r, gc = n0 + c;
            if (gr < rows && gc < out) y[(unsigned long long)gr * out + gc] = __float2bfloat16_rn(stage[r * ld_stage + c] + bias[gc]);
        }
        __syncthreads();
    }
}
// ---- bf16, aligned shapes: every operand staged with 16-byte loads --------
//
// When rows, rank, inp and out are multiples of 16 (ViT shapes at batch
// sizes that are multiples of 8, e.g. 256 × 50 tokens), no tile needs zero
// padding and every row is 16-byte aligned. One block of 256 threads
// (8 warps) per 64 rows (4 row tiles of 16).
//   phase 1: for each chunk of 256 input columns, x[64][256] and V[rank][256]
//            are copied to shared memory with 16-byte loads (each thread
//            issues its loads in batches before storing, so many are in
//            flight). Warp w owns column tiles j ≡ w (mod 8) of h (≤ 2) and
//            multiplies each V fragment into its row tiles. Below 8 column
//            tiles (rank < 128), 2 or 4 warps share a column tile and split
//            the 4 row tiles, so that every warp has work. h goes through a
//            per-warp 16×16 fp32 staging tile, is rounded to bf16 into
//            hs[64][rank+8] and written to global h.
//   phase 2: for each chunk of 128 output columns, U[128][rank] is copied to
//            shared memory (in the space V used); warp w computes output
//            column tile w of the chunk for all 4 row tiles, then stages each
//            16×16 fp32 tile, adds the bias and writes bf16, one 16-byte
//            store per lane.
// Shared memory (bytes), ld = 256 + 8: staging 8·16·16·4 = 8192,
// x chunk 2·64·ld = 33792, V chunk 2·rank·ld (U chunk 2·128·(rank+8) fits
// in it for rank ≥ 16), hs 2·64·(rank+8).
#define AL_KC 256
#define AL_LDX (AL_KC + 8)
#define AL_BN 128

// dst[r][c] = src[r * ld_src + c] for r < nrows, c < ncols (ncols % 8 == 0),
// 16-byte copies; loads are issued 4 at a time before their stores.
__device__ __forceinline__ void copy_rows16(bf16* dst, int ld_dst, const bf16* src, unsigned long long ld_src, int nrows, int ncols) {
    const int per_row = ncols / 8, total = nrows * per_row;
    for (int base = threadIdx.x; base < total; base += 4 * blockDim.x) {
        uint4 val[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            int idx = base + q * blockDim.x;
            if (idx < total) val[q] = *(const uint4*)(src + (idx / per_row) * ld_src + (idx % per_row) * 8);
        }
#pragma unroll
        for (int q = 0; q < 4; q++) {
            int idx = base + q * blockDim.x;
            if (idx < total) *(uint4*)(dst + (idx / per_row) * ld_dst + (idx % per_row) * 8) = val[q];
        }
    }
}

KERNEL_BOUNDS(lowrank_forward_aligned, 256)(act_t* y, act_t* h, const act_t* x, const act_t* v, const act_t* u,
                                            const float* bias, int rows, int inp, int rank, int out) {
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int ld_h = rank + 8;
    float* stage_all = (float*)smem_raw;                  // [8 warps][16][16]
    bf16* xs = (bf16*)(stage_all + 8 * 256);              // [64][AL_LDX]
    bf16* ws = xs + TC_BM * AL_LDX;                       // V chunk [rank][AL_LDX], then U chunk [128][ld_h]
    bf16* hs = ws + rank * AL_LDX;                        // [64][ld_h]
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    float* stage = stage_all + warp * 256;
    const int row0 = blockIdx.x * TC_BM;
    const int live_rows = min(TC_BM, rows - row0);        // a multiple of 16
    const int ntiles = rank / 16;
    const int G = ntiles >= 8 ? 1 : (ntiles >= 4 ? 2 : 4);
    const int col_groups = 8 / G;
    const int col_group = warp / G;
    const int row_tiles = 4 / G;
    const int row_tile0 = (warp % G) * row_tiles;

    // ---- phase 1: h = x Vᵀ
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int i = 0; i < 4; i++) wmma::fill_fragment(acc[t][i], 0.f);
    for (int k0 = 0; k0 < inp; k0 += AL_KC) {
        const int kc = min(AL_KC, inp - k0);
        __syncthreads();
        copy_rows16(xs, AL_LDX, x + (unsigned long long)row0 * inp + k0, inp, live_rows, kc);
        copy_rows16(ws, AL_LDX, v + k0, inp, rank, kc);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < 2; t++) {
            const int j = col_group + col_groups * t;
            if (j >= ntiles) continue;
            for (int k = 0; k < kc; k += 16) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                wmma::load_matrix_sync(b, ws + j * 16 * AL_LDX + k, AL_LDX);
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    if (i >= row_tiles) break;
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                    wmma::load_matrix_sync(a, xs + (row_tile0 + i) * 16 * AL_LDX + k, AL_LDX);
                    wmma::mma_sync(acc[t][i], a, b, acc[t][i]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < 2; t++) {
        const int j = col_group + col_groups * t;
        if (j >= ntiles) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (i >= row_tiles) break;
            const int it = row_tile0 + i;
            wmma::store_matrix_sync(stage, acc[t][i], 16, wmma::mem_row_major);
            __syncwarp();
            for (int e = lane; e < 256; e += WARP) {
                int r = e / 16, c = e % 16;
                bf16 hv = __float2bfloat16_rn(stage[e]);
                hs[(it * 16 + r) * ld_h + j * 16 + c] = hv;
                int gr = row0 + it * 16 + r;
                if (gr < rows) h[(unsigned long long)gr * rank + j * 16 + c] = hv;
            }
            __syncwarp();
        }
    }

    // ---- phase 2: y = h Uᵀ + b, 128 output columns per chunk
    for (int n0 = 0; n0 < out; n0 += AL_BN) {
        const int nc = min(AL_BN, out - n0);
        __syncthreads();  // hs complete (first chunk); ws free (later chunks)
        copy_rows16(ws, ld_h, u + (unsigned long long)n0 * rank, rank, nc, rank);
        __syncthreads();
        const int ct = warp;  // column tile of this chunk
        if (ct * 16 >= nc) continue;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> yacc[4];
#pragma unroll
        for (int i = 0; i < 4; i++) wmma::fill_fragment(yacc[i], 0.f);
        for (int k = 0; k < rank; k += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
            wmma::load_matrix_sync(b, ws + ct * 16 * ld_h + k, ld_h);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                wmma::load_matrix_sync(a, hs + i * 16 * ld_h + k, ld_h);
                wmma::mma_sync(yacc[i], a, b, yacc[i]);
            }
        }
        // lane → row lane/2, 8 columns (lane%2)·8: one 16-byte store.
        const int r = lane / 2, c0 = (lane % 2) * 8;
        const int gc = n0 + ct * 16 + c0;
        float b8[8];
#pragma unroll
        for (int e = 0; e < 8; e++) b8[e] = bias[gc + e];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            wmma::store_matrix_sync(stage, yacc[i], 16, wmma::mem_row_major);
            __syncwarp();
            int gr = row0 + i * 16 + r;
            if (gr < rows) {
                __align__(16) bf16 o[8];
#pragma unroll
                for (int e = 0; e < 8; e++) o[e] = __float2bfloat16_rn(stage[r * 16 + c0 + e] + b8[e]);
                *(uint4*)(y + (unsigned long long)gr * out + gc) = *(uint4*)o;
            }
            __syncwarp();
        }
    }
}
#endif
