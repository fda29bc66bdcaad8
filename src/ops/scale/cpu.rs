//! LayerScale and the scalar scale on the CPU: rayon over rows (or
//! elementwise chunks); dγ through `matmul::cpu::column_sums`, whose f64
//! sum of row chunks does not depend on the thread count.

use super::{Grads, ScaleKernel};
use crate::device::Cpu;
use crate::ops::matmul::cpu::column_sums;
use crate::ops::simd::ELEMENTWISE_CHUNK;
use crate::ops::{Checked, Rows};
use anyhow::Result;
use rayon::prelude::*;

/// `out[r, c] = x[r, c] · gamma[c]`.
pub fn scale_forward(out: &mut [f32], x: &[f32], gamma: &[f32], shape: Rows) {
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return;
    }
    out[..rows * cols]
        .par_chunks_mut(cols)
        .zip(x[..rows * cols].par_chunks(cols))
        .for_each(|(o, x)| {
            for ((o, x), g) in o.iter_mut().zip(x).zip(&gamma[..cols]) {
                *o = x * g;
            }
        });
}

/// WRITES `dx = dy · gamma`, ADDS `dgamma[c] += Σ_r dy[r, c] · x[r, c]`.
pub fn scale_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dy: &[f32],
    x: &[f32],
    gamma: &[f32],
    shape: Rows,
) {
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return;
    }
    scale_forward(dx, dy, gamma, shape);
    let sums = column_sums(rows, cols, |r, acc| {
        let row = r * cols..(r + 1) * cols;
        for ((a, g), x) in acc.iter_mut().zip(&dy[row.clone()]).zip(&x[row]) {
            *a += g * x;
        }
    });
    for (d, s) in dgamma[..cols].iter_mut().zip(sums) {
        *d += s as f32;
    }
}

impl ScaleKernel for Cpu {
    fn scale_forward(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        shape: Rows,
        _: Checked,
    ) -> Result<()> {
        scale_forward(out, x, gamma, shape);
        Ok(())
    }
    fn scale_backward(
        &self,
        Grads { dx, dgamma }: Grads<'_, Vec<f32>>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        gamma: &Vec<f32>,
        shape: Rows,
        _: Checked,
    ) -> Result<()> {
        scale_backward(dx, dgamma, dy, x, gamma, shape);
        Ok(())
    }
    fn scale_by(&self, x: &mut Vec<f32>, alpha: f32, len: usize, _: Checked) -> Result<()> {
        x[..len]
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .for_each(|x| x.iter_mut().for_each(|v| *v *= alpha));
        Ok(())
    }
}
