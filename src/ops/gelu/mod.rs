//! The MLP's activation, elementwise, in the three forms ViT checkpoints
//! use (`Activation`):
//!
//! ```text
//! gelu        y  = x · Φ(x) = x/2 · (1 + erf(x/√2))        exact (Hendrycks & Gimpel)
//!             dx = dy · (Φ(x) + x · φ(x)),   φ(x) = exp(−x²/2) / √(2π)
//! gelu-tanh   y  = x/2 · (1 + tanh u) = x · σ(2u),   u = √(2/π) · (x + 0.044715 x³)
//!             dx = dy · (s + x · s(1 − s) · 2u'),   s = σ(2u),  u' = √(2/π) · (1 + 3 · 0.044715 x²)
//! quick-gelu  y  = x · σ(1.702 x)                               (OpenAI CLIP)
//!             dx = dy · (s + 1.702 x · s(1 − s)),   s = σ(1.702 x)
//! ```
//!
//! `gelu-tanh` is torch's `gelu(approximate='tanh')` (timm's `gelu_tanh`,
//! Hugging Face's `gelu_pytorch_tanh` and `gelu_new`). Both devices evaluate it in the
//! σ form: ½(1 + tanh u) = σ(2u) has no cancellation for negative x, where
//! 1 + tanh u does.
//!
//! The backward pass is given the forward's output y too: a device may
//! read Φ(x) = y/x off it for the exact GELU instead of evaluating erf again
//! (the CPU does; CUDA, whose y may be bf16, does not). The other two
//! evaluate σ again from x on both devices.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked};
use crate::device::Device;
use anyhow::{bail, Result};

/// Which GELU the MLP applies (module doc): the exact erf form, torch's tanh
/// approximation, or CLIP's quick GELU. Written in configs by `name`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    #[default]
    Gelu,
    GeluTanh,
    QuickGelu,
}

impl Activation {
    /// Every activation, in the order of the module doc.
    pub const ALL: [Activation; 3] = [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ];

    /// The name in configs and on the command line (as serde writes it).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu-tanh",
            Activation::QuickGelu => "quick-gelu",
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match Activation::ALL.into_iter().find(|a| a.name() == s) {
            Some(a) => Ok(a),
            None => bail!("unknown activation '{s}': use gelu, gelu-tanh or quick-gelu"),
        }
    }
}

/// What the backward pass reads of the forward's: its input `x` and its
/// output `y`.
pub struct Saved<'a, T> {
    pub x: &'a T,
    pub y: &'a T,
}

/// Device bodies of the activations (call `forward` / `backward`).
pub trait GeluKernel: Device {
    fn gelu_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        len: usize,
        act: Activation,
        _: Checked,
    ) -> Result<()>;
    fn gelu_backward(
        &self,
        dx: &mut Self::Buf,
        saved: Saved<'_, Self::Buf>,
        dout: &Self::Buf,
        len: usize,
        act: Activation,
        _: Checked,
    ) -> Result<()>;
}

/// Writes `out[i] = act(x[i])` for `i < len`.
pub fn forward<D: GeluKernel>(
    dev: &D,
    out: &mut D::Buf,
    x: &D::Buf,
    len: usize,
    act: Activation,
) -> Result<()> {
    need(dev, "gelu out", out, len)?;
    need(dev, "gelu x", x, len)?;
    // erf and a few multiplies: about 20 operations per element.
    let w = dev
        .profiling()
        .then(|| work(dev, &[(x, len), (out, len)], 20.0 * len as f64));
    profiled(dev, "gelu_forward", w, || {
        dev.gelu_forward(out, x, len, act, Checked::new())
    })
}

/// Writes `dx[i] = dout[i] · act'(x[i])` for `i < len`; `y` holds
/// `act(x)` as `forward` wrote it (module doc).
pub fn backward<D: GeluKernel>(
    dev: &D,
    dx: &mut D::Buf,
    x: &D::Buf,
    y: &D::Buf,
    dout: &D::Buf,
    len: usize,
    act: Activation,
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
        dev.gelu_backward(dx, Saved { x, y }, dout, len, act, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{backward, forward, Activation};
    use crate::device::Cpu;
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, dot, fd_check, randn, random, tol, EW};
    use std::f64::consts::PI;

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

    /// `(act(x), act'(x), |first term| + |second term| of act'(x))` in f64,
    /// straight from the formulas of the module doc (the tanh GELU as torch
    /// writes it, with tanh). The two terms of act' cancel where it crosses
    /// 0, so its error is measured against the sum of their sizes.
    fn in_f64(a: Activation, x: f64) -> (f64, f64, f64) {
        let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
        let (y, first, second) = match a {
            Activation::Gelu => {
                let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
                let pdf = (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
                (x * cdf, cdf, x * pdf)
            }
            Activation::GeluTanh => {
                let k = (2.0 / PI).sqrt();
                let t = (k * (x + 0.044715 * x * x * x)).tanh();
                let du = k * (1.0 + 3.0 * 0.044715 * x * x);
                (
                    0.5 * x * (1.0 + t),
                    0.5 * (1.0 + t),
                    0.5 * x * (1.0 - t * t) * du,
                )
            }
            Activation::QuickGelu => {
                let s = sigmoid(1.702 * x);
                (x * s, s, 1.702 * x * s * (1.0 - s))
            }
        };
        (y, first + second, first.abs() + second.abs())
    }

    #[test]
    fn names_parse_and_serialize_alike() {
        for a in Activation::ALL {
            assert_eq!(a.name().parse::<Activation>().unwrap(), a);
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                format!("\"{}\"", a.name())
            );
        }
        assert_eq!(Activation::default(), Activation::Gelu);
        assert!("gelu_tanh".parse::<Activation>().is_err());
    }

    /// Each activation and its gradient through the public entry points,
    /// from −12 to 12, against f64. The exact GELU to 8e-6 relative (3e-5
    /// below −4; the tests above hold it closer); the σ forms to
    /// 1e-6·(4 + |z|) relative, z the argument of σ, whose f32 rounding
    /// costs about |z|·1e-7 where σ is small. An absolute 1e-30 where σ is
    /// taken as 0 (z below −80), and 1e-15·|x| where f64's 1 + tanh u
    /// itself cancels.
    #[test]
    fn each_activation_matches_its_f64_formula() {
        let xs: Vec<f32> = (-12_000..=12_000).map(|i| i as f32 * 0.001).collect();
        let n = xs.len();
        let dout = vec![1.0f32; n];
        for a in Activation::ALL {
            let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
            forward(&Cpu, &mut y, &xs, n, a).unwrap();
            backward(&Cpu, &mut dx, &xs, &y, &dout, n, a).unwrap();
            for ((&x, &y), &g) in xs.iter().zip(&y).zip(&dx) {
                let xd = x as f64;
                let (want_y, want_g, g_scale) = in_f64(a, xd);
                let z: f64 = match a {
                    Activation::Gelu => 4.0,
                    Activation::GeluTanh => 1.6 * (xd + 0.044715 * xd * xd * xd),
                    Activation::QuickGelu => 1.702 * xd,
                };
                let rel = if a == Activation::Gelu && x < -4.0 {
                    3e-5
                } else {
                    1e-6 * (4.0 + z.abs())
                };
                for (what, got, want, scale) in [
                    ("y", y as f64, want_y, want_y.abs()),
                    ("dx", g as f64, want_g, g_scale),
                ] {
                    assert!(
                        (got - want).abs() <= rel * scale + 1e-30 + 1e-15 * xd.abs(),
                        "{} {what}({x}) = {got}, want {want}",
                        a.name()
                    );
                }
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (x, w) = (randn(1, 300, 2.0), random(300, 2));
        for a in Activation::ALL {
            let (mut dx, mut y) = (vec![0.0; 300], vec![0.0; 300]);
            forward(&Cpu, &mut y, &x, 300, a).unwrap();
            backward(&Cpu, &mut dx, &x, &y, &w, 300, a).unwrap();
            fd_check(a.name(), &x, &dx, 100, |x| {
                let mut y = vec![0.0; 300];
                forward(&Cpu, &mut y, &x.to_vec(), 300, a).unwrap();
                dot(&w, &y)
            });
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let (x, mut out) = (vec![0.0; 10], vec![0.0; 9]);
        for a in Activation::ALL {
            assert!(forward(&Cpu, &mut out, &x, 10, a).is_err());
            let y = x.clone();
            assert!(
                backward(&Cpu, &mut vec![0.0; 10], &x, &y, &out, 10, a).is_err(),
                "dout short"
            );
            assert!(
                backward(&Cpu, &mut vec![0.0; 10], &x, &out, &y, 10, a).is_err(),
                "y short"
            );
            assert!(
                backward(&Cpu, &mut out, &x, &y, &x.clone(), 10, a).is_err(),
                "dx short"
            );
        }
    }

    fn forward_and_backward_match_the_cpu<D: Backend>(dev: &D) {
        let n = 100_003;
        for a in Activation::ALL {
            let (c, g) = crate::on_both!(
                dev,
                vec![
                    act(randn(17, n, 3.0)),
                    act(vec![0.0; n]),
                    act(randn(18, n, 1.0)),
                    act(vec![0.0; n])
                ],
                |be, [x, out, dout, dx]| {
                    forward(be, out, x, n, a).unwrap();
                    backward(be, dx, x, out, dout, n, a).unwrap();
                }
            );
            assert_close(
                &format!("{} {:?}", a.name(), dev.precision()),
                &g,
                &c,
                tol(dev.precision(), EW),
            );
        }
    }

    crate::on_every_device!(forward_and_backward_match_the_cpu);
}
