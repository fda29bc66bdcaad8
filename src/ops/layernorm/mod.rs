//! LayerNorm over the last axis (Ba et al.), per row of `[rows, cols]`:
//!
//! ```text
//! forward   μ = mean(x),  σ² = mean((x − μ)²)  (two passes),  r = 1/√(σ² + ε)
//!           x̂ = (x − μ)·r,  y = γ ∘ x̂ + β
//! backward  dβ += Σ_rows dy,  dγ += Σ_rows dy ∘ x̂
//!           g = dy ∘ γ,  dx += r · (g − mean(g) − x̂ · mean(g ∘ x̂))
//! ```
//! The input gradient is added, since the residual stream's gradient is
//! already in `dx` (llm.c's convention).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::ops::testing::{dot, fd_check, random};

    const R: usize = 5;
    const C: usize = 24;

    fn forward(x: &[f32], g: &[f32], b: &[f32]) -> Vec<f32> {
        let (mut y, mut m, mut r) = (vec![0.0; R * C], vec![0.0; R], vec![0.0; R]);
        layernorm_forward(&mut y, &mut m, &mut r, x, g, b, R, C, 1e-6);
        y
    }

    #[test]
    fn rows_are_normalized() {
        let x: Vec<f32> = random(R * C, 1).iter().map(|v| 3.0 * v + 7.0).collect();
        let y = forward(&x, &[1.0; C], &[0.0; C]);
        for row in y.chunks(C) {
            let mean: f32 = row.iter().sum::<f32>() / C as f32;
            let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / C as f32;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
        }
    }

    #[test]
    fn backward_matches_finite_differences_and_adds() {
        let (x, g, b, w) = (random(R * C, 1), random(C, 2), random(C, 3), random(R * C, 4));
        let (mut y, mut m, mut r) = (vec![0.0; R * C], vec![0.0; R], vec![0.0; R]);
        layernorm_forward(&mut y, &mut m, &mut r, &x, &g, &b, R, C, 1e-6);
        let prior = random(R * C, 5);
        let (mut dx, mut dg, mut db) = (prior.clone(), vec![0.5; C], vec![0.5; C]);
        layernorm_backward(&mut dx, &mut dg, &mut db, &w, &x, &m, &r, &g, R, C);
        let dx_only: Vec<f32> = dx.iter().zip(&prior).map(|(a, p)| a - p).collect();
        let dg_only: Vec<f32> = dg.iter().map(|v| v - 0.5).collect();
        let db_only: Vec<f32> = db.iter().map(|v| v - 0.5).collect();
        fd_check("layernorm dx", &x, &dx_only, 60, |x| dot(&w, &forward(x, &g, &b)));
        fd_check("layernorm dgamma", &g, &dg_only, C, |g| dot(&w, &forward(&x, g, &b)));
        fd_check("layernorm dbeta", &b, &db_only, C, |b| dot(&w, &forward(&x, &g, b)));
    }
}
