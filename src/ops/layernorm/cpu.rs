//! LayerNorm on the CPU: rows in parallel, two-pass mean and variance in
//! f64; parameter gradients summed per column block in row order
//! (deterministic).

use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], rows: usize, cols: usize, eps: f32) {
    out[..rows * cols]
        .par_chunks_mut(cols)
        .zip(x[..rows * cols].par_chunks(cols))
        .zip(mean[..rows].par_iter_mut().zip(rstd[..rows].par_iter_mut()))
        .for_each(|((o, x), (m, r))| {
            let mu = x.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            for (j, (o, &v)) in o.iter_mut().zip(x).enumerate() {
                *o = ((v as f64 - mu) * rs) as f32 * gamma[j] + beta[j];
            }
            *m = mu as f32;
            *r = rs as f32;
        });
}

/// ADDS the input gradient to `dx` and the parameter gradients to
/// `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(dx: &mut [f32], dgamma: &mut [f32], dbeta: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32], gamma: &[f32], rows: usize, cols: usize) {
    dx[..rows * cols].par_chunks_mut(cols).enumerate().for_each(|(r, dx)| {
        let (x, g) = (&x[r * cols..(r + 1) * cols], &dout[r * cols..(r + 1) * cols]);
        let (mu, rs) = (mean[r], rstd[r]);
        let (mut mean_dn, mut mean_dn_xhat) = (0f64, 0f64);
        for j in 0..cols {
            let dn = (g[j] * gamma[j]) as f64;
            mean_dn += dn;
            mean_dn_xhat += dn * ((x[j] - mu) * rs) as f64;
        }
        mean_dn /= cols as f64;
        mean_dn_xhat /= cols as f64;
        for j in 0..cols {
            let xhat = ((x[j] - mu) * rs) as f64;
            let dn = (g[j] * gamma[j]) as f64;
            dx[j] += (rs as f64 * (dn - mean_dn - xhat * mean_dn_xhat)) as f32;
        }
    });
    const BLOCK: usize = 64;
    dgamma[..cols].par_chunks_mut(BLOCK).zip(dbeta[..cols].par_chunks_mut(BLOCK)).enumerate().for_each(|(blk, (dg, db))| {
        let c0 = blk * BLOCK;
        let (mut ag, mut ab) = (vec![0f64; dg.len()], vec![0f64; db.len()]);
        for r in 0..rows {
            for k in 0..dg.len() {
                let j = c0 + k;
                let g = dout[r * cols + j] as f64;
                ag[k] += g * ((x[r * cols + j] - mean[r]) * rstd[r]) as f64;
                ab[k] += g;
            }
        }
        for k in 0..dg.len() {
            dg[k] += ag[k] as f32;
            db[k] += ab[k] as f32;
        }
    });
}
