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
