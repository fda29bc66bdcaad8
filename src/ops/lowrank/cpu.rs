//! The low-rank layer on the CPU: two strided products, `h = x Vᵀ` then
//! `y = h Uᵀ + b` (the CUDA kernel fuses them; here `h` is needed anyway).

use crate::ops::matmul::cpu::{linear_forward, matmul};

/// Writes `h[rows, r] = x · vᵀ` and `y[rows, out] = h · uᵀ + bias`.
#[allow(clippy::too_many_arguments)]
pub fn lowrank_forward(y: &mut [f32], h: &mut [f32], x: &[f32], v: &[f32], u: &[f32], bias: &[f32], rows: usize, inp: usize, rank: usize, out: usize) {
    matmul(h, x, v, rows, rank, inp, false, true, false);
    linear_forward(y, h, u, bias, rows, rank, out);
}
