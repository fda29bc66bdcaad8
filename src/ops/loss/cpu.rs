//! The losses on the CPU: one row (sample or token) per rayon task, row
//! losses summed in order in f64 (deterministic).

use super::{LogitLossConfig, Logits, LossKernel, Outputs};
use crate::device::Cpu;
use crate::ops::{Checked, Rows};
use anyhow::Result;
use rayon::prelude::*;

/// Norms below this count as this, so cos of a zero row is 0, not NaN
/// (PyTorch's `cosine_similarity` uses the same floor).
pub const COS_EPS: f64 = 1e-8;

/// `log softmax(row · inv_t)` in f64. A NaN or infinite logit makes the
/// result NaN, so a diverged model shows up as a NaN loss.
fn log_softmax(row: &[f32], inv_t: f64) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| {
        if v.is_finite() {
            m.max(v as f64 * inv_t)
        } else {
            f64::NAN
        }
    });
    let log_sum = row
        .iter()
        .map(|&v| (v as f64 * inv_t - max).exp())
        .sum::<f64>()
        .ln();
    row.iter()
        .map(|&v| v as f64 * inv_t - max - log_sum)
        .collect()
}

/// MSE + (1 − cos) of one row pair; adds `weight` × its gradient to `g`.
/// Returns the unweighted value.
fn mse_cos_row(s: &[f32], t: &[f32], weight: f64, mse_denominator: f64, g: &mut [f64]) -> f64 {
    let (mut dot, mut ss, mut tt, mut se) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in s.iter().zip(t) {
        let (a, b) = (a as f64, b as f64);
        dot += a * b;
        ss += a * a;
        tt += b * b;
        se += (a - b) * (a - b);
    }
    let (ns, nt) = (ss.sqrt().max(COS_EPS), tt.sqrt().max(COS_EPS));
    let cos = dot / (ns * nt);
    for ((gj, &a), &b) in g.iter_mut().zip(s).zip(t) {
        let (a, b) = (a as f64, b as f64);
        *gj += weight * (2.0 * (a - b) / mse_denominator - (b / (ns * nt) - cos * a / (ns * ns)));
    }
    se / mse_denominator + 1.0 - cos
}

/// Per-row value and gradient of the fused logit loss (see `LogitLossConfig`).
fn logit_row(
    s: &[f32],
    t: Option<&[f32]>,
    label: Option<u32>,
    cfg: &LogitLossConfig,
    g: &mut [f64],
) -> f64 {
    let c = s.len();
    g.fill(0.0);
    let mut loss = 0f64;
    if cfg.ce_weight != 0.0 {
        let y = label.expect("labels are given when ce_weight != 0") as usize;
        let log_p = log_softmax(s, 1.0);
        let ls = cfg.label_smoothing as f64;
        let w = cfg.ce_weight as f64;
        for j in 0..c {
            let q = ls / c as f64 + if j == y { 1.0 - ls } else { 0.0 };
            loss -= w * q * log_p[j];
            g[j] += w * (log_p[j].exp() - q);
        }
    }
    if cfg.kd_weight != 0.0 {
        let t = t.expect("teacher logits are given when kd_weight != 0");
        let temp = cfg.temperature as f64;
        let log_ps = log_softmax(s, 1.0 / temp);
        let log_pt = log_softmax(t, 1.0 / temp);
        let w = cfg.kd_weight as f64;
        let mut kl = 0f64;
        for j in 0..c {
            let pt = log_pt[j].exp();
            if pt > 0.0 {
                kl += pt * (log_pt[j] - log_ps[j]);
            }
            g[j] += w * temp * (log_ps[j].exp() - pt);
        }
        loss += w * temp * temp * kl;
    }
    if cfg.feature_weight != 0.0 {
        let t = t.expect("teacher logits are given when feature_weight != 0");
        let w = cfg.feature_weight as f64;
        loss += w * mse_cos_row(s, t, w, c as f64, g);
    }
    loss
}

pub fn logit_loss(
    out: Outputs<'_, [f32]>,
    logits: Logits<'_, [f32]>,
    shape: Rows,
    cfg: &LogitLossConfig,
    scale: f32,
) {
    let Outputs { ds, loss } = out;
    let Logits {
        student: s,
        teacher,
        labels,
    } = logits;
    let Rows {
        rows: batch,
        cols: classes,
    } = shape;
    let k = scale as f64 / batch as f64;
    let rows: Vec<f64> = ds[..batch * classes]
        .par_chunks_mut(classes)
        .enumerate()
        .map(|(i, d)| {
            let mut g = vec![0f64; classes];
            let t = teacher.map(|t| &t[i * classes..(i + 1) * classes]);
            let l = logit_row(
                &s[i * classes..(i + 1) * classes],
                t,
                labels.get(i).copied(),
                cfg,
                &mut g,
            );
            for (d, g) in d.iter_mut().zip(g) {
                *d = (g * k) as f32;
            }
            l
        })
        .collect();
    loss[0] += (rows.iter().sum::<f64>() * k) as f32;
}

pub fn feature_loss(out: Outputs<'_, [f32]>, s: &[f32], t: &[f32], shape: Rows, scale: f32) {
    let Outputs { ds, loss } = out;
    let Rows { rows, cols } = shape;
    // loss = scale · (Σ (s − t)² / (rows·cols) + Σ_rows (1 − cos) / rows)
    //      = Σ_rows (scale/rows) · (Σ_row (s − t)² / cols + 1 − cos)
    let w = scale as f64 / rows as f64;
    let values: Vec<f64> = ds[..rows * cols]
        .par_chunks_mut(cols)
        .enumerate()
        .map(|(r, d)| {
            let mut g = vec![0f64; cols];
            let v = mse_cos_row(
                &s[r * cols..(r + 1) * cols],
                &t[r * cols..(r + 1) * cols],
                w,
                cols as f64,
                &mut g,
            );
            for (d, g) in d.iter_mut().zip(g) {
                *d += g as f32;
            }
            v
        })
        .collect();
    loss[0] += (values.iter().sum::<f64>() * w) as f32;
}

impl LossKernel for Cpu {
    fn logit_loss(
        &self,
        out: Outputs<'_, Vec<f32>>,
        logits: Logits<'_, Vec<f32>>,
        shape: Rows,
        cfg: &LogitLossConfig,
        scale: f32,
        _: Checked,
    ) -> Result<()> {
        let out: Outputs<'_, [f32]> = Outputs {
            ds: out.ds,
            loss: out.loss,
        };
        let logits: Logits<'_, [f32]> = Logits {
            student: logits.student,
            teacher: logits.teacher.map(|t| t.as_slice()),
            labels: logits.labels,
        };
        logit_loss(out, logits, shape, cfg, scale);
        Ok(())
    }
    fn feature_loss(
        &self,
        out: Outputs<'_, Vec<f32>>,
        s: &Vec<f32>,
        t: &Vec<f32>,
        shape: Rows,
        scale: f32,
        _: Checked,
    ) -> Result<()> {
        let out: Outputs<'_, [f32]> = Outputs {
            ds: out.ds,
            loss: out.loss,
        };
        feature_loss(out, s, t, shape, scale);
        Ok(())
    }
}
