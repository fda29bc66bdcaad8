//! LayerNorm on the CPU: rows in parallel; per-row sums in 8 f32 lanes
//! combined in f64 (vectorized, deterministic); parameter gradients summed
//! per 64-row chunk in parallel, chunks combined in order.

use crate::ops::matmul::cpu::{column_sums, lane_sum};
use crate::ops::simd::vectorized;
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], rows: usize, cols: usize, eps: f32) {
    out[..rows * cols]
        .par_chunks_mut(cols)
        .zip(x[..rows * cols].par_chunks(cols))
        .zip(mean[..rows].par_iter_mut().zip(rstd[..rows].par_iter_mut()))
        .for_each(|((o, x), (m, r))| {
            vectorized(
                #[inline(always)]
                || {
                    let mu = (lane_sum(cols, |j| x[j]) / cols as f64) as f32;
                    let var = lane_sum(cols, |j| (x[j] - mu) * (x[j] - mu)) / cols as f64;
                    let rs = (1.0 / (var + eps as f64).sqrt()) as f32;
                    for j in 0..cols {
                        o[j] = (x[j] - mu) * rs * gamma[j] + beta[j];
                    }
                    *m = mu;
                    *r = rs;
                },
            )
        });
}

/// ADDS the input gradient to `dx` and the parameter gradients to
/// `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(dx: &mut [f32], dgamma: &mut [f32], dbeta: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32], rows: usize, cols: usize) {
    dx[..rows * cols].par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
        let (x, g) = (&x[r * cols..(r + 1) * cols], &dout[r * cols..(r + 1) * cols]);
        let (mu, rs) = (mean[r], rstd[r]);
        vectorized(
            #[inline(always)]
            || {
                let mean_dn = (lane_sum(cols, |j| g[j] * gamma[j]) / cols as f64) as f32;
                let mean_dn_xhat = (lane_sum(cols, |j| g[j] * gamma[j] * (x[j] - mu) * rs) / cols as f64) as f32;
                for j in 0..cols {
                    let xhat = (x[j] - mu) * rs;
                    dx[j] += rs * (g[j] * gamma[j] - mean_dn - xhat * mean_dn_xhat);
                }
            },
        )
    });
    let dg = column_sums(rows, cols, |r, out| {
        let (x, g) = (&x[r * cols..(r + 1) * cols], &dout[r * cols..(r + 1) * cols]);
        let (mu, rs) = (mean[r], rstd[r]);
        for j in 0..cols {
            out[j] += g[j] * (x[j] - mu) * rs;
        }
    });
    let db = column_sums(rows, cols, |r, out| {
        for (o, g) in out.iter_mut().zip(&dout[r * cols..(r + 1) * cols]) {
            *o += g;
        }
    });
    for j in 0..cols {
        dgamma[j] += dg[j] as f32;
        dbeta[j] += db[j] as f32;
    }
}
