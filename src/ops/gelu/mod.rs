//! GELU, exact (Hendrycks & Gimpel), elementwise:
//!
//! ```text
//! forward   y  = x · Φ(x) = x/2 · (1 + erf(x/√2))
//! backward  dx = dy · (Φ(x) + x · φ(x)),   φ(x) = exp(−x²/2) / √(2π)
//! ```
//!
//! The backward pass is given the forward's output y too: a device may
//! read Φ(x) = y/x off it instead of evaluating erf again (the CPU does;
//! CUDA, whose y may be bf16, does not).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Device bodies of GELU (call `forward` / `backward`).
pub trait GeluKernel: Device {
    fn gelu_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        len: usize,
        _: Checked,
    ) -> Result<()>;
    fn gelu_backward(
        &self,
        dx: &mut Self::Buf,
        x: &Self::Buf,
        y: &Self::Buf,
        dout: &Self::Buf,
        len: usize,
        _: Checked,
    ) -> Result<()>;
}

/// Writes `out[i] = gelu(x[i])` for `i < len`.
pub fn forward<D: GeluKernel>(dev: &D, out: &mut D::Buf, x: &D::Buf, len: usize) -> Result<()> {
    need(dev, "gelu out", out, len)?;
    need(dev, "gelu x", x, len)?;
    // erf and a few multiplies: about 20 operations per element.
    let w = dev
        .profiling()
        .then(|| work(dev, &[(x, len), (out, len)], 20.0 * len as f64));
    profiled(dev, "gelu_forward", w, || {
        dev.gelu_forward(out, x, len, Checked::new())
    })
}

/// Writes `dx[i] = dout[i] · gelu'(x[i])` for `i < len`; `y` holds
/// `gelu(x)` as `forward` wrote it (module doc).
pub fn backward<D: GeluKernel>(
    dev: &D,
    dx: &mut D::Buf,
    x: &D::Buf,
    y: &D::Buf,
    dout: &D::Buf,
    len: usize,
) -> Result<()> {
    need(dev, "gelu dx", dx, len)?;
    need(dev, "gelu x", x, len)?;
    need(dev, "gelu y", y, len)?;
    need(dev, "gelu dout", dout, len)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[(x, len), (y, len), (dout, len), (dx, len)],
            20.0 * len as f64,
        )
    });
    profiled(dev, "gelu_backward", w, || {
        dev.gelu_backward(dx, x, y, dout, len, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{backward, forward};
    use crate::device::Cpu;
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, dot, fd_check, randn, random, tol, EW};

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
            // Below x = −12.73 (Φ < 1e-37, near f32's subnormal range) Φ is
            // taken as 0 (`cpu::CDF_IS_ZERO_BEYOND`).
            let tol = if x > -4.0 {
                3e-6 * want
            } else if x > -12.7 {
                3e-5 * want
            } else {
                1e-36
            };
            assert!((got - want).abs() <= tol, "Φ({x}) = {got}, want {want}");
            let y = x * 5.0;
            let (e, want_e) = (exp(y) as f64, (y as f64).exp());
            assert!(
                (e - want_e).abs() <= 3e-7 * want_e,
                "exp({y}) = {e}, want {want_e}"
            );
        }
    }

    /// gelu' read off the forward's output against f64 and against gelu'
    /// evaluated afresh, from −20 to 20, through 0 and tiny |x|: error
    /// relative to |Φ| + |x·φ| (the two terms cancel near x = −0.75) of
    /// 2e-6 (3e-5 below −4, as Φ itself), an absolute 1e-36 past −13 where
    /// y is subnormal and `exp` stops at e^−87.
    #[test]
    fn gradient_from_the_output_matches_the_gradient_recomputed() {
        let mut xs: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 0.001).collect();
        xs.extend([
            1e-20,
            -1e-20,
            1e-17,
            -1e-17,
            1e-10,
            -1e-10,
            f32::MIN_POSITIVE,
            -0.0,
        ]);
        for x in xs {
            let got = gelu_grad_from_output(x, gelu(x)) as f64;
            let xd = x as f64;
            let (cdf, x_pdf) = (
                0.5 * libm::erfc(-xd / std::f64::consts::SQRT_2),
                xd * (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt(),
            );
            let (want, scale) = (cdf + x_pdf, cdf.abs() + x_pdf.abs());
            let tol = if x > -4.0 {
                2e-6 * scale
            } else if x > -13.0 {
                3e-5 * scale
            } else {
                1e-36
            };
            assert!(
                (got - want).abs() <= tol.max(1e-36),
                "gelu'({x}) from y = {got}, want {want}"
            );
            let recomputed = gelu_grad(x) as f64;
            assert!(
                (got - recomputed).abs() <= 2.0 * tol.max(1e-36),
                "gelu'({x}): from y {got}, recomputed {recomputed}"
            );
        }
    }

    /// Far below zero Φ is exactly 0 and nothing subnormal is made
    /// (`cpu::CDF_IS_ZERO_BEYOND`): GELU and its gradient there are 0 or
    /// normal numbers, never subnormal ones, and tiny against 1e-36.
    #[test]
    fn far_negative_inputs_make_no_subnormals() {
        for i in 0..=20_000 {
            let x = -10.0 - i as f32 * 0.001;
            let (y, g, cdf) = (gelu(x), gelu_grad_from_output(x, gelu(x)), normal_cdf(x));
            for (name, v) in [("gelu", y), ("gelu'", g), ("Φ", cdf)] {
                assert!(!v.is_subnormal() && v.abs() < 1e-20, "{name}({x}) = {v:e}");
            }
        }
        assert_eq!(normal_cdf(-12.8), 0.0);
        assert!(normal_cdf(-12.6) > 0.0);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (x, w) = (random(300, 1), random(300, 2));
        let (mut dx, mut y) = (vec![0.0; 300], vec![0.0; 300]);
        gelu_forward(&mut y, &x, 300);
        gelu_backward(&mut dx, &x, &y, &w, 300);
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
        let y = x.clone();
        assert!(
            backward(&Cpu, &mut vec![0.0; 10], &x, &y, &out, 10).is_err(),
            "dout short"
        );
        assert!(
            backward(&Cpu, &mut vec![0.0; 10], &x, &out, &y, 10).is_err(),
            "y short"
        );
        assert!(
            backward(&Cpu, &mut out, &x, &y, &x.clone(), 10).is_err(),
            "dx short"
        );
    }

    fn forward_and_backward_match_the_cpu<D: Backend>(dev: &D) {
        let n = 100_003;
        let (c, g) = crate::on_both!(
            dev,
            vec![
                act(randn(17, n, 3.0)),
                act(vec![0.0; n]),
                act(randn(18, n, 1.0)),
                act(vec![0.0; n])
            ],
            |be, [x, out, dout, dx]| {
                forward(be, out, x, n).unwrap();
                backward(be, dx, x, out, dout, n).unwrap();
            }
        );
        assert_close(
            &format!("gelu {:?}", dev.precision()),
            &g,
            &c,
            tol(dev.precision(), EW),
        );
    }

    crate::on_every_device!(forward_and_backward_match_the_cpu);
}
