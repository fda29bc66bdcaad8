//! The low-rank layer on the CPU: two strided products, `h = x Vᵀ` then
//! `y = h Uᵀ + b` (the CUDA kernel fuses them; here `h` is needed anyway).

use super::LowRankKernel;
use crate::device::Cpu;
use crate::ops::matmul::cpu::{linear_forward, matmul};
use crate::ops::Checked;
use anyhow::Result;

/// Writes `h[rows, r] = x · vᵀ` and `y[rows, out] = h · uᵀ + bias`.
#[allow(clippy::too_many_arguments)]
pub fn lowrank_forward(
    y: &mut [f32],
    h: &mut [f32],
    x: &[f32],
    v: &[f32],
    u: &[f32],
    bias: &[f32],
    rows: usize,
    inp: usize,
    rank: usize,
    out: usize,
) {
    matmul(h, x, v, rows, rank, inp, false, true, false);
    linear_forward(y, h, u, bias, rows, rank, out);
}

impl LowRankKernel for Cpu {
    fn lowrank_forward(
        &self,
        y: &mut Vec<f32>,
        h: &mut Vec<f32>,
        x: &Vec<f32>,
        v: &Vec<f32>,
        u: &Vec<f32>,
        bias: &Vec<f32>,
        rows: usize,
        inp: usize,
        rank: usize,
        out: usize,
        _: Checked,
    ) -> Result<()> {
        lowrank_forward(y, h, x, v, u, bias, rows, inp, rank, out);
        Ok(())
    }
}
