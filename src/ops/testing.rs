//! Test helpers shared by the op folders: random inputs and a central
//! finite-difference check.
//!
//! The check perturbs one input at a time by ±h and compares
//! `(L(x+h) − L(x−h)) / 2h` with the analytic gradient. Ops run in fp32; the
//! objective is summed in f64. With h = 1e-2 and inputs of order 1 the
//! truncation error (h²·f'''/6 ≈ 1e-5) and the rounding error
//! (ε_f32·|L|/h ≈ 1e-5·|L|) stay far below the 1% tolerance, while a wrong
//! or missing term moves a gradient by far more.

use crate::rng::Rng;

pub fn random(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, 1.0)
}

/// `Σ w·out` in f64: the scalar objective whose gradient w.r.t. `out` is `w`.
pub fn dot(w: &[f32], out: &[f32]) -> f64 {
    w.iter().zip(out).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Compare `analytic` with central differences of `loss` at `x`, on up to
/// `samples` coordinates chosen at random.
pub fn fd_check(name: &str, x: &[f32], analytic: &[f32], samples: usize, mut loss: impl FnMut(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-2f32;
    let mut rng = Rng::new(99);
    let mut p = x.to_vec();
    for _ in 0..samples.min(x.len()) {
        let i = rng.below(x.len());
        p[i] = x[i] + h;
        let up = loss(&p);
        p[i] = x[i] - h;
        let down = loss(&p);
        p[i] = x[i];
        let numeric = (up - down) / (2.0 * h as f64);
        let a = analytic[i] as f64;
        let tol = 1e-2 * numeric.abs().max(a.abs()) + 1e-3;
        assert!((numeric - a).abs() <= tol, "{name}[{i}]: analytic {a}, finite difference {numeric}");
    }
}
