//! AdamW (Loshchilov & Hutter) with global-norm clipping, per element:
//!
//! ```text
//! g  = grad · min(1, max_norm / ‖grad‖_global)      (‖·‖² summed by sum_squares)
//! m  = β1 m + (1 − β1) g,      v = β2 v + (1 − β2) g²
//! p −= lr · (wd · p + (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + ε))
//! ```
//! The decay is decoupled from the gradient (PyTorch's `AdamW`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Hyper-parameters of one AdamW step (`update`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay: `p -= lr * weight_decay * p`.
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
    /// Clip the global gradient norm to this value; `None` for no clipping.
    pub max_grad_norm: Option<f32>,
}

/// A parameter tensor and its two moments, `len` elements each: what an
/// AdamW step updates in place.
pub struct State<'a, B: ?Sized> {
    pub param: &'a mut B,
    pub m: &'a mut B,
    pub v: &'a mut B,
}

/// Device bodies of the optimizer (call `sum_squares` / `update`).
pub trait AdamWKernel: Device {
    fn sum_squares(&self, acc: &mut Self::Buf, x: &Self::Buf, len: usize, _: Checked)
        -> Result<()>;
    fn adamw_update(
        &self,
        state: State<'_, Self::Buf>,
        grad: &Self::Buf,
        grad_norm_sq: &Self::Buf,
        len: usize,
        hp: &AdamWStep,
        _: Checked,
    ) -> Result<()>;
}

/// ADDS `Σ x[i]²` over `i < len` to `acc[0]` (global gradient norm).
pub fn sum_squares<D: AdamWKernel>(
    dev: &D,
    acc: &mut D::Buf,
    x: &D::Buf,
    len: usize,
) -> Result<()> {
    need(dev, "sum_squares acc", acc, 1)?;
    need(dev, "sum_squares x", x, len)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(x, len), (acc, 2)], 2.0 * len as f64));
    profiled(dev, "sum_squares", w, || {
        dev.sum_squares(acc, x, len, Checked::new())
    })
}

/// One AdamW step on `state.param[len]` with gradient `grad`, moments
/// `state.m`, `state.v`.
/// With `hp.max_grad_norm = Some(c)`, the gradient is first multiplied by
/// `min(1, c / sqrt(grad_norm_sq[0]))` (the global norm over all
/// parameters, summed by `sum_squares`). Then, with `g` the scaled gradient:
/// `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
///  p -= lr (wd p + (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps))`.
pub fn update<D: AdamWKernel>(
    dev: &D,
    state: State<'_, D::Buf>,
    grad: &D::Buf,
    grad_norm_sq: &D::Buf,
    len: usize,
    hp: &AdamWStep,
) -> Result<()> {
    let State { param, m, v } = state;
    need(dev, "adamw param", param, len)?;
    need(dev, "adamw grad", grad, len)?;
    need(dev, "adamw m", m, len)?;
    need(dev, "adamw v", v, len)?;
    need(dev, "adamw grad_norm_sq", grad_norm_sq, 1)?;
    if hp.step == 0 {
        anyhow::bail!("adamw: step numbers start at 1 (bias correction divides by 1 - beta^step)");
    }
    // param, m, v read and written, grad read (a bf16 weight copy that the
    // kernel also rewrites is not counted); about 16 operations per element.
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[(param, 2 * len), (m, 2 * len), (v, 2 * len), (grad, len)],
            16.0 * len as f64,
        )
    });
    profiled(dev, "adamw_update", w, || {
        let state = State { param, m, v };
        dev.adamw_update(state, grad, grad_norm_sq, len, hp, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::AdamWStep;
    use crate::device::{Cpu, Device, Precision};
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, par, randn, BF16, RED};

    fn hp(step: u32, clip: Option<f32>) -> AdamWStep {
        AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
            max_grad_norm: clip,
        }
    }

    #[test]
    fn two_steps_match_a_hand_computation() {
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        adamw_update(&mut p, &[0.5], &mut m, &mut v, 0.25, 1, &hp(1, None));
        // Step 1: m̂ = g, v̂ = g², update = g/|g| = 1; p = 1 − 0.1·(0.01 + 1).
        assert!((p[0] - 0.899).abs() < 1e-6, "{}", p[0]);
        adamw_update(&mut p, &[-0.5], &mut m, &mut v, 0.25, 1, &hp(2, None));
        let (m2, v2): (f64, f64) = (0.9 * 0.05 + 0.1 * -0.5, 0.999 * 0.00025 + 0.001 * 0.25);
        let (mh, vh) = (m2 / (1.0 - 0.81), v2 / (1.0 - 0.998_001));
        let want = 0.899 - 0.1 * (0.01 * 0.899 + mh / (vh.sqrt() + 1e-8));
        assert!((p[0] as f64 - want).abs() < 1e-5, "{} vs {want}", p[0]);
    }

    #[test]
    fn clipping_scales_the_gradient_by_the_global_norm() {
        assert_eq!(clip_scale(16.0, Some(1.0)), 0.25);
        assert_eq!(clip_scale(0.25, Some(1.0)), 1.0);
        assert_eq!(clip_scale(16.0, None), 1.0);
        // With clipping the first step's moment holds the clipped gradient.
        let (mut p, mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
        adamw_update(
            &mut p,
            &[3.0, 4.0],
            &mut m,
            &mut v,
            25.0,
            2,
            &hp(1, Some(1.0)),
        );
        assert!((m[0] - 0.1 * 0.6).abs() < 1e-7 && (m[1] - 0.1 * 0.8).abs() < 1e-7);
        let mut acc = vec![1.0];
        sum_squares(&mut acc, &[3.0, 4.0], 2);
        assert_eq!(acc[0], 26.0);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let z = |n: usize| vec![0.0f32; n];
        let h = hp(1, None);
        for short in 0..5 {
            let l = |i: usize, n: usize| if i == short { n - 1 } else { n };
            let res = super::update(
                &Cpu,
                super::State {
                    param: &mut z(l(0, 4)),
                    m: &mut z(l(2, 4)),
                    v: &mut z(l(3, 4)),
                },
                &z(l(1, 4)),
                &z(l(4, 1)),
                4,
                &h,
            );
            assert!(res.is_err(), "update with argument {short} short");
        }
        assert!(
            super::update(
                &Cpu,
                super::State {
                    param: &mut z(4),
                    m: &mut z(4),
                    v: &mut z(4)
                },
                &z(4),
                &z(1),
                4,
                &hp(0, None)
            )
            .is_err(),
            "step 0"
        );
        assert!(super::sum_squares(&Cpu, &mut z(0), &z(4), 4).is_err());
        assert!(super::sum_squares(&Cpu, &mut z(1), &z(3), 4).is_err());
    }

    fn update_matches_the_cpu<D: Backend>(dev: &D) {
        let n = 300_001;
        for clip in [None, Some(0.5), Some(1e6)] {
            let h = AdamWStep {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.05,
                step: 3,
                max_grad_norm: clip,
            };
            let inputs = vec![
                par(randn(49, n, 1.0)),
                par(randn(50, n, 0.01)),
                par(randn(51, n, 0.01)),
                par(randn(52, n, 1e-4).iter().map(|v| v.abs()).collect()),
                par(vec![0.125]),
            ];
            let (c, g) = crate::on_both!(dev, inputs, |be, [w, grad, m, v, gn]| {
                super::sum_squares(be, gn, grad, n).unwrap();
                super::update(be, super::State { param: w, m, v }, grad, gn, n, &h).unwrap();
            });
            // Everything here is fp32 on every device.
            assert_close(
                &format!("adamw {:?} clip {clip:?}", dev.precision()),
                &g,
                &c,
                RED,
            );
        }
    }

    /// The bf16 copy of a weight follows its fp32 master: after an AdamW step
    /// (which rewrites the copy) and after a plain write (which marks it stale),
    /// a product with the weight matches the CPU's product with the new values.
    fn weight_copies_follow_updates<D: Backend>(dev: &D) {
        use crate::ops::matmul::{linear_forward, DenseShape};
        let (rows, inp, out) = (64, 48, 40);
        let s = DenseShape { rows, inp, out };
        let h = AdamWStep {
            lr: 1e-1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
            max_grad_norm: None,
        };
        let inputs = vec![
            act(vec![0.0; rows * out]),
            act(randn(60, rows * inp, 1.0)),
            par(randn(61, out * inp, 0.3)),
            par(vec![0.0; out]),
            par(randn(62, out * inp, 1.0)),
            par(vec![0.0; out * inp]),
            par(vec![0.0; out * inp]),
            par(vec![0.0]),
        ];
        let (c, g) = crate::on_both!(dev, inputs, |be, [y, x, w, bias, grad, m, v, gn]| {
            linear_forward(be, y, x, w, bias, s).unwrap();
            super::update(be, super::State { param: w, m, v }, grad, gn, out * inp, &h).unwrap();
            linear_forward(be, y, x, w, bias, s).unwrap();
            // Keep the product after the step (its first row) in `bias`, one of
            // the compared buffers, before overwriting y.
            let y_after_step = be.download(y).unwrap();
            be.write(w, &randn(63, out * inp, 0.3)).unwrap();
            linear_forward(be, y, x, w, bias, s).unwrap();
            be.write(bias, &y_after_step[..out]).unwrap();
        });
        let tolerance = if dev.precision() == Precision::Bf16 {
            BF16
        } else {
            RED
        };
        assert_close(
            &format!("weight copy after AdamW and write {:?}", dev.precision()),
            &g,
            &c,
            tolerance,
        );
    }

    crate::on_every_device!(update_matches_the_cpu);
    crate::on_every_device!(weight_copies_follow_updates);
}
