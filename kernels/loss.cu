// Fused losses: value and gradient in one kernel, one block per row, fp64
// reductions (the CPU reference sums in f64). A non-finite logit makes the
// row's max NaN, so a diverged model gives a NaN loss, as on the CPU.
//
// logit_loss, per sample with s, t the logit rows, C classes, k = scale/batch:
//   CE:   q_j = ls/C + (j==y)(1−ls);  L += −w_ce Σ q_j log p_j;          g_j += w_ce (p_j − q_j)
//   KD:   ps = softmax(s/T), pt = softmax(t/T);
//         L += w_kd T² Σ_{pt>0} pt (log pt − log ps);                    g_j += w_kd T (ps_j − pt_j)
//   feat: L += w_f (Σ(s−t)²/C + 1 − cos);  cos = s·t / (max(‖s‖,ε) max(‖t‖,ε))
//         g_j += w_f (2(s_j−t_j)/C − (t_j/(‖s‖‖t‖) − cos s_j/‖s‖²))
//   ds = k·g (WRITES);  loss[0] += k·L  (atomicAdd)
// feature_loss, per row with w = scale/rows: the MSE+(1−cos) term with weight w
//   and denominator cols; ds += w·g (ADDS); loss[0] += w·value.
// Logits and their gradients are act_t (common.cuh); all math in fp32/fp64.
#include "common.cuh"

#define COS_EPS 1e-8

struct Lse {
    double max;
    double log_sum;
};

// log Σ exp(v_j · inv_t) over the row, NaN when any v_j is not finite.
__device__ Lse row_lse(const act_t* v, int c, double inv_t, double* dscratch, float* fscratch) {
    float m = -INFINITY;
    int bad = 0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float x = to_float(v[j]);
        if (!isfinite(x)) bad = 1;
        m = fmaxf(m, (float)((double)x * inv_t));
    }
    double any_bad = block_sum_d((double)bad, dscratch);
    // The shift only guards exp against overflow: any value near the max
    // gives the same log-sum-exp, so the fp32 max suffices.
    double mx = any_bad > 0.0 ? (double)NAN : (double)block_max(m, fscratch);
    double s = 0.0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += exp((double)to_float(v[j]) * inv_t - mx);
    s = block_sum_d(s, dscratch);
    Lse r = {mx, log(s)};
    return r;
}

struct MseCos {
    double ns, nt, cos, value;
};

__device__ MseCos mse_cos_stats(const act_t* s, const act_t* t, int c, double denom, double* dscratch) {
    double dot = 0.0, ss = 0.0, tt = 0.0, se = 0.0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        double a = to_float(s[j]), b = to_float(t[j]);
        dot += a * b;
        ss += a * a;
        tt += b * b;
        se += (a - b) * (a - b);
    }
    dot = block_sum_d(dot, dscratch);
    ss = block_sum_d(ss, dscratch);
    tt = block_sum_d(tt, dscratch);
    se = block_sum_d(se, dscratch);
    MseCos r;
    r.ns = fmax(sqrt(ss), COS_EPS);
    r.nt = fmax(sqrt(tt), COS_EPS);
    r.cos = dot / (r.ns * r.nt);
    r.value = se / denom + 1.0 - r.cos;
    return r;
}

__device__ __forceinline__ double mse_cos_grad(const MseCos& m, double a, double b, double denom) {
    return 2.0 * (a - b) / denom - (b / (m.ns * m.nt) - m.cos * a / (m.ns * m.ns));
}

KERNEL(logit_loss)(act_t* ds, float* loss, const act_t* s_all, const act_t* t_all,
                                      const unsigned int* labels, int batch, int classes, float ce_w, float ls,
                                      float kd_w, float temperature, float feat_w, float scale) {
    __shared__ double dscratch[32];
    __shared__ float fscratch[32];
    int row = blockIdx.x;
    int c = classes;
    const act_t* s = s_all + (unsigned long long)row * c;
    const act_t* t = t_all ? t_all + (unsigned long long)row * c : 0;
    double k = (double)scale / batch;
    double temp = temperature;
    Lse ce = {0.0, 0.0}, ks = {0.0, 0.0}, kt = {0.0, 0.0};
    MseCos fm = {0.0, 0.0, 0.0, 0.0};
    if (ce_w != 0.f) ce = row_lse(s, c, 1.0, dscratch, fscratch);
    if (kd_w != 0.f) {
        ks = row_lse(s, c, 1.0 / temp, dscratch, fscratch);
        kt = row_lse(t, c, 1.0 / temp, dscratch, fscratch);
    }
    if (feat_w != 0.f) fm = mse_cos_stats(s, t, c, (double)c, dscratch);
    int y = ce_w != 0.f ? (int)labels[row] : -1;
    double lsd = ls;
    double part = 0.0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        double g = 0.0;
        double sj = to_float(s[j]);
        if (ce_w != 0.f) {
            double log_p = sj - ce.max - ce.log_sum;
            double q = lsd / c + (j == y ? 1.0 - lsd : 0.0);
            part -= (double)ce_w * q * log_p;
            g += (double)ce_w * (exp(log_p) - q);
        }
        if (kd_w != 0.f) {
            double log_ps = sj / temp - ks.max - ks.log_sum;
            double log_pt = (double)to_float(t[j]) / temp - kt.max - kt.log_sum;
            double pt = exp(log_pt);
            if (pt > 0.0) part += (double)kd_w * temp * temp * pt * (log_pt - log_ps);
            g += (double)kd_w * temp * (exp(log_ps) - pt);
        }
        if (feat_w != 0.f) g += (double)feat_w * mse_cos_grad(fm, sj, (double)to_float(t[j]), (double)c);
        ds[(unsigned long long)row * c + j] = to_act((float)(g * k));
    }
    double total = block_sum_d(part, dscratch);
    if (feat_w != 0.f) total += (double)feat_w * fm.value;
    if (threadIdx.x == 0) atomicAdd(loss, (float)(total * k));
}

KERNEL(feature_loss)(act_t* ds, float* loss, const act_t* s_all, const act_t* t_all, int rows,
                                        int cols, float scale) {
    __shared__ double dscratch[32];
    int row = blockIdx.x;
    const act_t* s = s_all + (unsigned long long)row * cols;
    const act_t* t = t_all + (unsigned long long)row * cols;
    double w = (double)scale / rows;
    MseCos fm = mse_cos_stats(s, t, cols, (double)cols, dscratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        ds[(unsigned long long)row * cols + j] = to_act(to_float(ds[(unsigned long long)row * cols + j]) + (float)(w * mse_cos_grad(fm, to_float(s[j]), to_float(t[j]), (double)cols)));
    if (threadIdx.x == 0) atomicAdd(loss, (float)(w * fm.value));
}
