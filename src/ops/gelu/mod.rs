//! GELU, exact (Hendrycks & Gimpel), elementwise:
//!
//! ```text
//! forward   y  = x · Φ(x) = x/2 · (1 + erf(x/√2))
//! backward  dx = dy · (Φ(x) + x · φ(x)),   φ(x) = exp(−x²/2) / √(2π)
//! ```

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Device bodies of GELU (call `forward` / `backward`).
pub trait GeluKernel: Device {
    fn gelu_forward(&self, out: &mut Self::Buf, x: &Self::Buf, len: usize, _: Checked) -> Result<()>;
    fn gelu_backward(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf, len: usize, _: Checked) -> Result<()>;
}

/// Writes `out[i] = gelu(x[i])` for `i < len`.
pub fn forward<D: GeluKernel>(dev: &D, out: &mut D::Buf, x: &D::Buf, len: usize) -> Result<()> {
    need(dev, "gelu out", out, len)?;
    need(dev, "gelu x", x, len)?;
    // erf and a few multiplies: about 20 operations per element.
    let w = dev.profiling().then(|| work(dev, &[(x, len), (out, len)], 20.0 * len as f64));
    profiled(dev, "gelu_forward", w, || dev.gelu_forward(out, x, len, Checked::new()))
}

/// Writes `dx[i] = dout[i] · gelu'(x[i])` for `i < len`.
pub fn backward<D: GeluKernel>(dev: &D, dx: &mut D::Buf, x: &D::Buf, dout: &D::Buf, len: usize) -> Result<()> {
    need(dev, "gelu dx", dx, len)?;
    need(dev, "gelu x", x, len)?;
    need(dev, "gelu dout", dout, len)?;
    let w = dev.profiling().then(|| work(dev, &[(x, len), (dout, len), (dx, len)], 30.0 * len as f64));
    profiled(dev, "gelu_backward", w, || dev.gelu_backward(dx, x, dout, len, Checked::new()))
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{backward, forward};
    use crate::device::Cpu;
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, dot, fd_check, random, randn, tol, EW};

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

    #[test]
    fn wrong_lengths_are_errors() {
        let (x, mut out) = (vec![0.0; 10], vec![0.0; 9]);
        assert!(forward(&Cpu, &mut out, &x, 10).is_err());
        assert!(backward(&Cpu, &mut vec![0.0; 10], &x, &out, 10).is_err());
        assert!(backward(&Cpu, &mut out, &x, &x.clone(), 10).is_err());
    }

    fn forward_and_backward_match_the_cpu<D: Backend>(dev: &D) {
        let n = 100_003;
        let (c, g) = crate::on_both!(dev, vec![act(randn(17, n, 3.0)), act(vec![0.0; n]), act(randn(18, n, 1.0)), act(vec![0.0; n])], |be, [x, out, dout, dx]| {
            forward(be, out, x, n).unwrap();
            backward(be, dx, x, dout, n).unwrap();
        });
        assert_close(&format!("gelu {:?}", dev.precision()), &g, &c, tol(dev.precision(), EW));
    }

    crate::on_every_device!(forward_and_backward_match_the_cpu);
}
