// Patch embedding input, token assembly, row copies and pooling, forward and backward.
//
//   patch_gather:    patches[b·G² + py·G + px, (c, y, x)] = images[b, c, py·P + y, px·P + x],  G = S/P
//   tokens_forward:  x[b, 0] = cls + pos[0];  x[b, 1+i] = patch_out[b, i] + pos[1+i]
//   tokens_backward: dpatch_out[b, i] = dx[b, 1+i] (WRITES);
//                    dpos[t] += Σ_b dx[b, t];  dcls += Σ_b dx[b, 0]  (ADDS; summed over b in order)
//   cls_gather:      out[b] = x[b, 0];   cls_scatter_add: dx[b, 0] += dout[b]
//   copy_rows:       dst[b, dst_at + j] (+)= src[s, src_at + j],  s = broadcast ? 0 : b
//                    (copy_rows_param: the same from an fp32 parameter)
//   sum_rows_over_batch:  dsrc[src_at + j] += Σ_b dx[b, dst_at + j]   (ADDS; summed over b in order)
//   mean_rows:       dst[b, dst_at] = Σ_{j<count} src[b, src_at + j] / count   (summed over j in order)
//   mean_rows_backward:   dsrc[b, src_at + j] += ddst[b, dst_at] / count
// Activations (images, patches, tokens and their gradients) are act_t
// (common.cuh); cls, pos, the parameters of copy_rows_param and every
// parameter gradient fp32.
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

KERNEL(patch_gather)(act_t* patches, const act_t* images, int batch, int channels, int size, int patch) {
    int grid = size / patch;
    unsigned long long row_len = (unsigned long long)channels * patch * patch;
    unsigned long long n = (unsigned long long)batch * grid * grid * row_len;
    GRID_STRIDE(i, n) {
        unsigned long long row = i / row_len;
        int col = (int)(i % row_len);
        int b = (int)(row / (grid * grid)), cell = (int)(row % (grid * grid));
        int py = cell / grid, px = cell % grid;
        int c = col / (patch * patch), y = (col / patch) % patch, x = col % patch;
        patches[i] = images[(((unsigned long long)b * channels + c) * size + py * patch + y) * size + px * patch + x];
    }
}

KERNEL(tokens_forward)(act_t* x, const act_t* patch_out, const float* cls, const float* pos,
                                          int batch, int n_patches, int width) {
    int t = n_patches + 1;
    unsigned long long n = (unsigned long long)batch * t * width;
    GRID_STRIDE(i, n) {
        unsigned long long row = i / width;
        int c = (int)(i % width);
        int b = (int)(row / t), tok = (int)(row % t);
        float src = tok == 0 ? cls[c] : to_float(patch_out[((unsigned long long)b * n_patches + tok - 1) * width + c]);
        x[i] = to_act(src + pos[(unsigned long long)tok * width + c]);
    }
}

KERNEL(tokens_backward_patches)(act_t* dpatch_out, const act_t* dx, int batch, int n_patches, int width) {
    int t = n_patches + 1;
    unsigned long long n = (unsigned long long)batch * n_patches * width;
    GRID_STRIDE(i, n) {
        unsigned long long row = i / width;
        int c = (int)(i % width);
        int b = (int)(row / n_patches), p = (int)(row % n_patches);
        dpatch_out[i] = dx[((unsigned long long)b * t + 1 + p) * width + c];
    }
}

// One thread per (token, column): the batch sum for dpos, and for dcls on token 0.
KERNEL(tokens_backward_params)(float* dcls, float* dpos, const act_t* dx, int batch, int n_patches, int width) {
    int t = n_patches + 1;
    unsigned long long n = (unsigned long long)t * width;
    GRID_STRIDE(i, n) {
        int tok = (int)(i / width), c = (int)(i % width);
        float s = 0.f;
        for (int b = 0; b < batch; b++) s += to_float(dx[((unsigned long long)b * t + tok) * width + c]);
        dpos[i] += s;
        if (tok == 0) dcls[c] += s;
    }
}

KERNEL(cls_gather)(act_t* out, const act_t* x, int batch, int tokens, int width) {
    unsigned long long n = (unsigned long long)batch * width;
    GRID_STRIDE(i, n) {
        int b = (int)(i / width), c = (int)(i % width);
        out[i] = x[(unsigned long long)b * tokens * width + c];
    }
}

KERNEL(cls_scatter_add)(act_t* dx, const act_t* dout, int batch, int tokens, int width) {
    unsigned long long n = (unsigned long long)batch * width;
    GRID_STRIDE(i, n) {
        int b = (int)(i / width), c = (int)(i % width);
        act_t* d = dx + (unsigned long long)b * tokens * width + c;
        *d = to_act(to_float(*d) + to_float(dout[i]));
    }
}

// One thread per (image, row, column) of the copied rows. S is act_t, or
// float for a parameter source (the same type unless activations are bf16).
template <typename S>
__device__ void copy_rows_body(act_t* dst, const S* src, int batch, int width, int src_tokens, int src_at,
                               int dst_tokens, int dst_at, int rows, int broadcast, int add) {
    unsigned long long n = (unsigned long long)batch * rows * width;
    GRID_STRIDE(i, n) {
        unsigned long long row = i / width;
        int c = (int)(i % width);
        int b = (int)(row / rows), j = (int)(row % rows);
        int s = broadcast ? 0 : b;
        float v = to_float(src[((unsigned long long)s * src_tokens + src_at + j) * width + c]);
        act_t* d = dst + ((unsigned long long)b * dst_tokens + dst_at + j) * width + c;
        *d = to_act(add ? to_float(*d) + v : v);
    }
}

KERNEL(copy_rows)(act_t* dst, const act_t* src, int batch, int width, int src_tokens, int src_at,
                  int dst_tokens, int dst_at, int rows, int broadcast, int add) {
    copy_rows_body(dst, src, batch, width, src_tokens, src_at, dst_tokens, dst_at, rows, broadcast, add);
}

KERNEL(copy_rows_param)(act_t* dst, const float* src, int batch, int width, int src_tokens, int src_at,
                        int dst_tokens, int dst_at, int rows, int broadcast, int add) {
    copy_rows_body(dst, src, batch, width, src_tokens, src_at, dst_tokens, dst_at, rows, broadcast, add);
}

// One thread per (row, column) of dsrc: the batch sum from zero, then added.
KERNEL(sum_rows_over_batch)(float* dsrc, const act_t* dx, int batch, int width, int src_at, int dst_tokens,
                            int dst_at, int rows) {
    unsigned long long n = (unsigned long long)rows * width;
    GRID_STRIDE(i, n) {
        int j = (int)(i / width), c = (int)(i % width);
        float s = 0.f;
        for (int b = 0; b < batch; b++) s += to_float(dx[((unsigned long long)b * dst_tokens + dst_at + j) * width + c]);
        dsrc[((unsigned long long)src_at + j) * width + c] += s;
    }
}

// One thread per (image, column): consecutive threads read consecutive columns.
KERNEL(mean_rows)(act_t* dst, const act_t* src, int batch, int width, int src_tokens, int src_at, int count,
                  int dst_tokens, int dst_at) {
    unsigned long long n = (unsigned long long)batch * width;
    GRID_STRIDE(i, n) {
        int b = (int)(i / width), c = (int)(i % width);
        const act_t* s = src + ((unsigned long long)b * src_tokens + src_at) * width + c;
        float acc = 0.f;
        for (int j = 0; j < count; j++) acc += to_float(s[(unsigned long long)j * width]);
        dst[((unsigned long long)b * dst_tokens + dst_at) * width + c] = to_act(acc / (float)count);
    }
}

// One thread per (image, pooled row, column) of dsrc.
KERNEL(mean_rows_backward)(act_t* dsrc, const act_t* ddst, int batch, int width, int src_tokens, int src_at,
                           int count, int dst_tokens, int dst_at) {
    unsigned long long n = (unsigned long long)batch * count * width;
    GRID_STRIDE(i, n) {
        unsigned long long row = i / width;
        int c = (int)(i % width);
        int b = (int)(row / count), j = (int)(row % count);
        float g = to_float(ddst[((unsigned long long)b * dst_tokens + dst_at) * width + c]) / (float)count;
        act_t* d = dsrc + ((unsigned long long)b * src_tokens + src_at + j) * width + c;
        *d = to_act(to_float(*d) + g);
    }
}
