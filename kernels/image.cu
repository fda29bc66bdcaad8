// Raw bytes to model input: bilinear resize (PyTorch interpolate,
// align_corners=False) then per-channel normalization. Forward only (data).
//
//   src_coord(o) = max((o + ½) · in/out − ½, 0);  i0 = min(⌊src⌋, in−1);  i1 = min(i0+1, in−1);  λ = src − i0
//   v = (1−λy)((1−λx) p(y0,x0) + λx p(y0,x1)) + λy((1−λx) p(y1,x0) + λx p(y1,x1))
//   out[b, c, oy, ox] = (v/255 − mean[c]) / std[c]
// The output is act_t (common.cuh); math in fp32.
#include "common.cuh"

__device__ __forceinline__ void tap(int o, int in, int out, int* i0, int* i1, float* l) {
    float scale = (float)in / (float)out;
    float src = fmaxf(__fsub_rn(__fmul_rn(__fadd_rn((float)o, 0.5f), scale), 0.5f), 0.f);
    int a = min((int)floorf(src), in - 1);
    *i0 = a;
    *i1 = min(a + 1, in - 1);
    *l = src - (float)a;
}

KERNEL(images_from_bytes)(act_t* out, const unsigned char* src, int batch, int channels, int h, int w,
                                             int s, float m0, float m1, float m2, float inv0, float inv1, float inv2) {
    unsigned long long n = (unsigned long long)batch * channels * s * s;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long plane = i / ((unsigned long long)s * s);
        int rem = (int)(i % ((unsigned long long)s * s));
        int oy = rem / s, ox = rem % s;
        int ch = (int)(plane % channels);
        int y0, y1, x0, x1;
        float ly, lx;
        tap(oy, h, s, &y0, &y1, &ly);
        tap(ox, w, s, &x0, &x1, &lx);
        const unsigned char* img = src + plane * h * w;
        float p00 = img[y0 * w + x0], p01 = img[y0 * w + x1], p10 = img[y1 * w + x0], p11 = img[y1 * w + x1];
        float v = (1.f - ly) * ((1.f - lx) * p00 + lx * p01) + ly * ((1.f - lx) * p10 + lx * p11);
        float mean = ch == 0 ? m0 : (ch == 1 ? m1 : m2);
        float inv = ch == 0 ? inv0 : (ch == 1 ? inv1 : inv2);
        out[i] = to_act((v / 255.f - mean) * inv);
    }
}

// The same with an intermediate size and a center crop (torchvision's
// Resize(r) then CenterCrop(s)): the image is resampled as if resized to
// r x r, and output pixel (oy, ox) is pixel (oy + off, ox + off) of it. Only
// the crop is computed. Launched only when a transform asks for a crop, so
// images_from_bytes above stays what the default path runs.
KERNEL(images_from_bytes_cropped)(act_t* out, const unsigned char* src, int batch, int channels, int h, int w,
                                  int s, int r, int off, float m0, float m1, float m2, float inv0, float inv1,
                                  float inv2) {
    unsigned long long n = (unsigned long long)batch * channels * s * s;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long plane = i / ((unsigned long long)s * s);
        int rem = (int)(i % ((unsigned long long)s * s));
        int oy = rem / s, ox = rem % s;
        int ch = (int)(plane % channels);
        int y0, y1, x0, x1;
        float ly, lx;
        tap(oy + off, h, r, &y0, &y1, &ly);
        tap(ox + off, w, r, &x0, &x1, &lx);
        const unsigned char* img = src + plane * h * w;
        float p00 = img[y0 * w + x0], p01 = img[y0 * w + x1], p10 = img[y1 * w + x0], p11 = img[y1 * w + x1];
        float v = (1.f - ly) * ((1.f - lx) * p00 + lx * p01) + ly * ((1.f - lx) * p10 + lx * p11);
        float mean = ch == 0 ? m0 : (ch == 1 ? m1 : m2);
        float inv = ch == 0 ? inv0 : (ch == 1 ? inv1 : inv2);
        out[i] = to_act((v / 255.f - mean) * inv);
    }
}
