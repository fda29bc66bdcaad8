//! GELU, exact (Hendrycks & Gimpel), elementwise:
//!
//! ```text
//! forward   y  = x · Φ(x) = x/2 · (1 + erf(x/√2))
//! backward  dx = dy · (Φ(x) + x · φ(x)),   φ(x) = exp(−x²/2) / √(2π)
//! ```

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::ops::testing::{dot, fd_check, random};

    #[test]
    fn matches_known_values() {
        // PyTorch: F.gelu(torch.tensor([-1., 0., 1., 2.]))
        let want = [-0.158_655_26f32, 0.0, 0.841_344_7, 1.954_499_7];
        for (x, w) in [-1.0f32, 0.0, 1.0, 2.0].iter().zip(want) {
            assert!((gelu(*x) - w).abs() < 1e-6, "gelu({x}) = {}", gelu(*x));
        }
    }

    #[test]
    fn cdf_and_exp_are_accurate_to_f32_precision() {
        for i in -4000..=4000 {
            let x = i as f32 * 0.004;
            let want = 0.5 * libm::erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let got = normal_cdf(x) as f64;
            // Relative 3e-6 down to Φ ≈ 3e-5 (x = −4); further out, where
            // GELU is below 1e-4, the f32 rounding of x² inside exp dominates.
            // Past x ≈ −13, Φ < 1e-38 is below f32's normal range.
            let tol = if x > -4.0 {
                3e-6 * want
            } else if x > -13.0 {
                3e-5 * want
            } else {
                1e-36
            };
            assert!((got - want).abs() <= tol, "Φ({x}) = {got}, want {want}");
            let y = x * 5.0;
            let (e, want_e) = (exp(y) as f64, (y as f64).exp());
            assert!((e - want_e).abs() <= 3e-7 * want_e, "exp({y}) = {e}, want {want_e}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (x, w) = (random(300, 1), random(300, 2));
        let mut dx = vec![0.0; 300];
        gelu_backward(&mut dx, &x, &w, 300);
        fd_check("gelu", &x, &dx, 100, |x| {
            let mut y = vec![0.0; 300];
            gelu_forward(&mut y, x, 300);
            dot(&w, &y)
        });
    }
}
