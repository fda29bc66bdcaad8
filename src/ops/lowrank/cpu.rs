//! The low-rank layer on the CPU: two strided products, `h = x Vᵀ` then
//! `y = h Uᵀ + b` (the CUDA kernel fuses them; here `h` is needed anyway).

use super::{LowRankKernel, LowRankShape, LowRankWeights};
use crate::device::Cpu;
use crate::ops::matmul::cpu::{linear_forward, matmul};
use crate::ops::Checked;
use anyhow::Result;

/// Writes `h[rows, r] = x · vᵀ` and `y[rows, out] = h · uᵀ + bias`.
pub fn lowrank_forward(
    y: &mut [f32],
    h: &mut [f32],
    x: &[f32],
    w: LowRankWeights<'_, [f32]>,
    s: LowRankShape,
) {
    matmul(h, x, w.v, s.first());
    linear_forward(y, h, w.u, w.bias, s.second());
}

impl LowRankKernel for Cpu {
    fn lowrank_forward(
        &self,
        y: &mut Vec<f32>,
        h: &mut Vec<f32>,
        x: &Vec<f32>,
        w: LowRankWeights<'_, Vec<f32>>,
        s: LowRankShape,
        _: Checked,
    ) -> Result<()> {
        let w = LowRankWeights {
            v: w.v.as_slice(),
            u: w.u.as_slice(),
            bias: w.bias.as_slice(),
        };
        lowrank_forward(y, h, x, w, s);
        Ok(())
    }
}
