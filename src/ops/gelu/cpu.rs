//! Exact GELU on the CPU, elementwise over rayon chunks.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;
const INV_SQRT2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_2PI: f32 = 0.398_942_3;

pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * INV_SQRT2))
}

pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + libm::erff(x * INV_SQRT2)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
}

pub fn gelu_forward(out: &mut [f32], x: &[f32], len: usize) {
    out[..len].par_chunks_mut(CHUNK).zip(x[..len].par_chunks(CHUNK)).for_each(|(o, x)| {
        for (o, &x) in o.iter_mut().zip(x) {
            *o = gelu(x);
        }
    });
}

pub fn gelu_backward(dx: &mut [f32], x: &[f32], dout: &[f32], len: usize) {
    dx[..len].par_chunks_mut(CHUNK).zip(x[..len].par_chunks(CHUNK)).zip(dout[..len].par_chunks(CHUNK)).for_each(|((d, x), g)| {
        for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
            *d = g * gelu_grad(x);
        }
    });
}
