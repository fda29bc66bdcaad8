//! AdamW and the global gradient norm on the CPU.

use super::{AdamWKernel, AdamWStep, State};
use crate::device::Cpu;
use crate::ops::simd::{vectorized, ELEMENTWISE_CHUNK as CHUNK};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

/// ADDS `Σ x²` to `acc[0]` (chunk sums combined in order: deterministic).
pub fn sum_squares(acc: &mut [f32], x: &[f32], len: usize) {
    let parts: Vec<f64> = x[..len]
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect();
    acc[0] += parts.iter().sum::<f64>() as f32;
}

/// The factor that clips the global norm: `min(1, max_norm / ‖g‖)`.
pub fn clip_scale(grad_norm_sq: f32, max_norm: Option<f32>) -> f32 {
    match max_norm {
        Some(c) if grad_norm_sq > 0.0 => (c / grad_norm_sq.sqrt()).min(1.0),
        _ => 1.0,
    }
}

pub fn adamw_update(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    grad_norm_sq: f32,
    len: usize,
    hp: &AdamWStep,
) {
    let scale = clip_scale(grad_norm_sq, hp.max_grad_norm);
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(hp.step as i32);
    let (b1, b2, lr, eps, wd) = (hp.beta1, hp.beta2, hp.lr, hp.eps, hp.weight_decay);
    let (bc1, bc2) = (bc1 as f32, bc2 as f32);
    param[..len]
        .par_chunks_mut(CHUNK)
        .zip(grad[..len].par_chunks(CHUNK))
        .zip(
            m[..len]
                .par_chunks_mut(CHUNK)
                .zip(v[..len].par_chunks_mut(CHUNK)),
        )
        .for_each(|((p, g), (m, v))| {
            vectorized(
                #[inline(always)]
                || {
                    for i in 0..p.len() {
                        let g = g[i] * scale;
                        m[i] = b1 * m[i] + (1.0 - b1) * g;
                        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                        let update = (m[i] / bc1) / ((v[i] / bc2).sqrt() + eps);
                        p[i] -= lr * (wd * p[i] + update);
                    }
                },
            )
        });
}

impl AdamWKernel for Cpu {
    fn sum_squares(&self, acc: &mut Vec<f32>, x: &Vec<f32>, len: usize, _: Checked) -> Result<()> {
        sum_squares(acc, x, len);
        Ok(())
    }
    fn adamw_update(
        &self,
        state: State<'_, Vec<f32>>,
        grad: &Vec<f32>,
        grad_norm_sq: &Vec<f32>,
        len: usize,
        hp: &AdamWStep,
        _: Checked,
    ) -> Result<()> {
        let State { param, m, v } = state;
        adamw_update(param, grad, m, v, grad_norm_sq[0], len, hp);
        Ok(())
    }
}
