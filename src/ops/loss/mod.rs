//! The losses of METHOD.md, forward and gradient in one pass, per row:
//!
//! ```text
//! CE (label smoothing ε, C classes)   q = (1−ε)·onehot(y) + ε/C
//!     L = −Σ q log softmax(s),                     dL/ds = softmax(s) − q
//! KD (temperature T)                   p_t = softmax(t/T),  p_s = softmax(s/T)
//!     L = T² · Σ p_t (log p_t − log p_s),          dL/ds = T · (p_s − p_t)
//! feature (per row of C values)        L = Σ(s − t)²/C + 1 − cos(s, t)
//!     dL/ds = 2(s − t)/C − (t/(‖s‖‖t‖) − cos · s/‖s‖²)
//! ```
//! `logit_loss` mixes CE, KD and the feature term on the logits with the
//! weights of `LogitLossConfig` and averages over the batch;
//! `feature_loss` applies the feature term to one block's feature map with
//! the MSE averaged over all elements and (1 − cos) over the rows.
//! Log-softmax is computed in f64 so a NaN or infinite logit makes the loss
//! NaN (the training loop stops on it) instead of being clamped away.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked, Rows};
use crate::device::Device;
use anyhow::{bail, Result};

/// Settings of the fused loss over the logits (`logit_loss`).
///
/// Per sample `i`, with student logits `s`, teacher logits `t`, label `y`,
/// averaged over the batch:
///
/// ```text
/// ce_weight * CE_ls(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))
///   + feature_weight * (MSE(s, t) + 1 - cos(s, t))
/// ```
///
/// `CE_ls` is cross-entropy against the label smoothed by `label_smoothing`
/// (target `1 - ls + ls/C` on the label and `ls/C` elsewhere). MSE is the mean
/// over the C logits of the sample; cos is the cosine of the two logit rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitLossConfig {
    pub ce_weight: f32,
    pub label_smoothing: f32,
    pub kd_weight: f32,
    pub temperature: f32,
    pub feature_weight: f32,
}

/// What a loss writes: the gradient `ds` with respect to the student's
/// values (the shape of `s`) and the running loss in `loss[0]`.
pub struct Outputs<'a, B: ?Sized> {
    pub ds: &'a mut B,
    pub loss: &'a mut B,
}

/// The inputs of `logit_loss`, `[batch, classes]` each: the student's
/// logits, the teacher's (needed by the KD and feature terms) and the
/// labels (needed by the CE term).
pub struct Logits<'a, B: ?Sized> {
    pub student: &'a B,
    pub teacher: Option<&'a B>,
    pub labels: &'a [u32],
}

impl<B: ?Sized> Clone for Logits<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Logits<'_, B> {}

/// Device bodies of the losses (call `logit_loss` / `feature_loss`).
pub trait LossKernel: Device {
    fn logit_loss(
        &self,
        out: Outputs<'_, Self::Buf>,
        logits: Logits<'_, Self::Buf>,
        shape: Rows,
        cfg: &LogitLossConfig,
        scale: f32,
        _: Checked,
    ) -> Result<()>;
    fn feature_loss(
        &self,
        out: Outputs<'_, Self::Buf>,
        s: &Self::Buf,
        t: &Self::Buf,
        shape: Rows,
        scale: f32,
        _: Checked,
    ) -> Result<()>;
}

/// Fused loss over the logits `s[batch, classes]` (see `LogitLossConfig`;
/// `shape` is `[batch, classes]`): WRITES `out.ds` (the gradient of the
/// batch-mean loss, times `scale`) and ADDS `scale` × the batch-mean loss
/// to `out.loss[0]`. `logits.teacher` is required when `kd_weight` or
/// `feature_weight` is non-zero; `logits.labels` when `ce_weight` is
/// non-zero.
pub fn logit_loss<D: LossKernel>(
    dev: &D,
    out: Outputs<'_, D::Buf>,
    logits: Logits<'_, D::Buf>,
    shape: Rows,
    cfg: &LogitLossConfig,
    scale: f32,
) -> Result<()> {
    let Rows {
        rows: batch,
        cols: classes,
    } = shape;
    let Logits {
        student: s,
        teacher,
        labels,
    } = logits;
    let n = shape.elements("logit_loss")?;
    need(dev, "logit_loss s", s, n)?;
    need(dev, "logit_loss ds", out.ds, n)?;
    need(dev, "logit_loss loss", out.loss, 1)?;
    if (cfg.kd_weight != 0.0 || cfg.feature_weight != 0.0) && teacher.is_none() {
        bail!("logit_loss: the KD or feature term needs teacher logits");
    }
    if let Some(t) = teacher {
        need(dev, "logit_loss teacher", t, n)?;
    }
    if cfg.kd_weight != 0.0 && (cfg.temperature.is_nan() || cfg.temperature <= 0.0) {
        bail!(
            "logit_loss: temperature must be positive, got {}",
            cfg.temperature
        );
    }
    if cfg.ce_weight != 0.0 {
        if labels.len() < batch {
            bail!("logit_loss: {} labels for a batch of {batch}", labels.len());
        }
        if let Some(&bad) = labels[..batch].iter().find(|&&y| y as usize >= classes) {
            bail!("logit_loss: label {bad} out of range for {classes} classes");
        }
    }
    let w = dev.profiling().then(|| {
        let t = teacher
            .map(|t| work(dev, &[(t, n)], 0.0))
            .unwrap_or_default();
        work(dev, &[(s, n), (out.ds, n)], 30.0 * n as f64) + t
    });
    profiled(dev, "logit_loss", w, || {
        dev.logit_loss(out, logits, shape, cfg, scale, Checked::new())
    })
}

/// Feature-matching loss of one feature map `s, t: [rows, cols]`:
/// `scale · (MSE(s, t) + mean over rows of (1 - cos(s_row, t_row)))`,
/// MSE averaged over all `rows*cols` elements. ADDS the loss to
/// `out.loss[0]` and the gradient with respect to `s` to `out.ds`.
pub fn feature_loss<D: LossKernel>(
    dev: &D,
    out: Outputs<'_, D::Buf>,
    s: &D::Buf,
    t: &D::Buf,
    shape: Rows,
    scale: f32,
) -> Result<()> {
    let n = shape.elements("feature_loss")?;
    need(dev, "feature_loss s", s, n)?;
    need(dev, "feature_loss t", t, n)?;
    need(dev, "feature_loss ds", out.ds, n)?;
    need(dev, "feature_loss loss", out.loss, 1)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(s, n), (t, n), (out.ds, 2 * n)], 10.0 * n as f64));
    profiled(dev, "feature_loss", w, || {
        dev.feature_loss(out, s, t, shape, scale, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{LogitLossConfig, Logits, Outputs};
    use crate::device::Cpu;
    use crate::ops::{Backend, Rows};
    use crate::rng::Rng;
    use crate::testing::{act, assert_close, fd_check, par, randn, random, tol, RED};

    const B: usize = 3;
    const C: usize = 7;

    fn value(s: &[f32], t: &[f32], labels: &[u32], cfg: &LogitLossConfig) -> f64 {
        let (mut ds, mut loss) = (vec![0.0; B * C], vec![0.0]);
        logit_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            Logits {
                student: s,
                teacher: Some(t),
                labels,
            },
            Rows::new(B, C),
            cfg,
            1.0,
        );
        loss[0] as f64
    }

    fn check(cfg: LogitLossConfig) {
        let (s, t) = (random(B * C, 1), random(B * C, 2));
        let labels = [2u32, 0, 6];
        let (mut ds, mut loss) = (vec![0.0; B * C], vec![0.0]);
        logit_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            Logits {
                student: &s,
                teacher: Some(&t),
                labels: &labels,
            },
            Rows::new(B, C),
            &cfg,
            1.0,
        );
        fd_check(&format!("{cfg:?}"), &s, &ds, B * C, |s| {
            value(s, &t, &labels, &cfg)
        });
    }

    fn cfg(ce: f32, ls: f32, kd: f32, temp: f32, feature: f32) -> LogitLossConfig {
        LogitLossConfig {
            ce_weight: ce,
            label_smoothing: ls,
            kd_weight: kd,
            temperature: temp,
            feature_weight: feature,
        }
    }

    #[test]
    fn each_term_and_their_sum_match_finite_differences() {
        check(cfg(1.0, 0.0, 0.0, 1.0, 0.0));
        check(cfg(1.0, 0.1, 0.0, 1.0, 0.0));
        check(cfg(0.0, 0.0, 1.0, 4.0, 0.0));
        check(cfg(0.0, 0.0, 0.0, 1.0, 1.0));
        check(cfg(0.5, 0.1, 0.5, 2.0, 0.3));
    }

    #[test]
    fn values_match_the_definitions() {
        // One sample, logits (0, ln 3): softmax = (1/4, 3/4).
        let s = [0.0f32, 3f32.ln()];
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            Logits {
                student: &s,
                teacher: None,
                labels: &[1],
            },
            Rows::new(1, 2),
            &cfg(1.0, 0.0, 0.0, 1.0, 0.0),
            1.0,
        );
        assert!((loss[0] as f64 - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        // KD of identical logits is zero; of (0,0) vs (0, ln 3) at T=1 it is KL((1/4,3/4) || (1/2,1/2)).
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            Logits {
                student: &[0.0, 0.0],
                teacher: Some(&s),
                labels: &[0],
            },
            Rows::new(1, 2),
            &cfg(0.0, 0.0, 1.0, 1.0, 0.0),
            1.0,
        );
        let kl = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((loss[0] as f64 - kl).abs() < 1e-6);
        // Feature term of s = 2t: MSE = mean(t²), cos = 1.
        let t = [1.0f32, 2.0];
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            Logits {
                student: &[2.0, 4.0],
                teacher: Some(&t),
                labels: &[0],
            },
            Rows::new(1, 2),
            &cfg(0.0, 0.0, 0.0, 1.0, 1.0),
            1.0,
        );
        assert!((loss[0] - 2.5).abs() < 1e-6, "{}", loss[0]);
    }

    #[test]
    fn a_nan_logit_gives_a_nan_loss() {
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            Logits {
                student: &[f32::NAN, 0.0],
                teacher: None,
                labels: &[0],
            },
            Rows::new(1, 2),
            &cfg(1.0, 0.0, 0.0, 1.0, 0.0),
            1.0,
        );
        assert!(loss[0].is_nan());
    }

    #[test]
    fn feature_loss_matches_finite_differences_and_adds() {
        let (rows, cols) = (4, 6);
        let (s, t) = (random(rows * cols, 1), random(rows * cols, 2));
        let mut ds = vec![1.0; rows * cols];
        let mut loss = vec![2.0];
        feature_loss(
            Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            &s,
            &t,
            Rows::new(rows, cols),
            0.7,
        );
        let grad: Vec<f32> = ds.iter().map(|v| v - 1.0).collect();
        fd_check("feature", &s, &grad, 24, |s| {
            let (mut d, mut l) = (vec![0.0; rows * cols], vec![0.0]);
            feature_loss(
                Outputs {
                    ds: &mut d,
                    loss: &mut l,
                },
                s,
                &t,
                Rows::new(rows, cols),
                0.7,
            );
            l[0] as f64
        });
        assert!(loss[0] > 2.0);
    }

    #[test]
    fn wrong_shapes_labels_and_missing_teachers_are_errors() {
        let z = |n: usize| vec![0.0f32; n];
        let ce = cfg(1.0, 0.0, 0.0, 1.0, 0.0);
        let kd = cfg(0.0, 0.0, 1.0, 4.0, 0.0);
        assert!(super::logit_loss(
            &Cpu,
            Outputs {
                ds: &mut z(B * C),
                loss: &mut z(1)
            },
            Logits {
                student: &z(B * C),
                teacher: None,
                labels: &[0, 1, 2]
            },
            Rows::new(B, C),
            &ce,
            1.0
        )
        .is_ok());
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C - 1),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C),
                    teacher: None,
                    labels: &[0, 1, 2]
                },
                Rows::new(B, C),
                &ce,
                1.0
            )
            .is_err(),
            "short ds"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(0)
                },
                Logits {
                    student: &z(B * C),
                    teacher: None,
                    labels: &[0, 1, 2]
                },
                Rows::new(B, C),
                &ce,
                1.0
            )
            .is_err(),
            "no loss slot"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C - 1),
                    teacher: None,
                    labels: &[0, 1, 2]
                },
                Rows::new(B, C),
                &ce,
                1.0
            )
            .is_err(),
            "short logits"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C),
                    teacher: None,
                    labels: &[0, 1]
                },
                Rows::new(B, C),
                &ce,
                1.0
            )
            .is_err(),
            "too few labels"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C),
                    teacher: None,
                    labels: &[0, 1, 7]
                },
                Rows::new(B, C),
                &ce,
                1.0
            )
            .is_err(),
            "label out of range"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C),
                    teacher: None,
                    labels: &[]
                },
                Rows::new(B, C),
                &kd,
                1.0
            )
            .is_err(),
            "KD without a teacher"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C),
                    teacher: Some(&z(B * C - 1)),
                    labels: &[]
                },
                Rows::new(B, C),
                &kd,
                1.0
            )
            .is_err(),
            "short teacher"
        );
        assert!(
            super::logit_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(B * C),
                    loss: &mut z(1)
                },
                Logits {
                    student: &z(B * C),
                    teacher: Some(&z(B * C)),
                    labels: &[]
                },
                Rows::new(B, C),
                &cfg(0.0, 0.0, 1.0, 0.0, 0.0),
                1.0
            )
            .is_err(),
            "temperature 0"
        );
        let (rows, cols) = (4, 6);
        for short in 0..4 {
            let l = |i: usize, n: usize| if i == short { n - 1 } else { n };
            let res = super::feature_loss(
                &Cpu,
                Outputs {
                    ds: &mut z(l(0, rows * cols)),
                    loss: &mut z(l(1, 1)),
                },
                &z(l(2, rows * cols)),
                &z(l(3, rows * cols)),
                Rows::new(rows, cols),
                1.0,
            );
            assert!(res.is_err(), "feature_loss with argument {short} short");
        }
    }

    fn logit_loss_matches_the_cpu<D: Backend>(dev: &D) {
        let (batch, classes) = (37, 1000);
        let mut rng = Rng::new(43);
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
        let configs = [
            cfg(1.0, 0.1, 0.0, 1.0, 0.0),
            cfg(0.0, 0.0, 1.0, 4.0, 0.0),
            cfg(0.0, 0.0, 0.0, 1.0, 1.0),
            cfg(0.5, 0.1, 0.5, 2.0, 0.3),
        ];
        for c in configs {
            let (cp, gp) = crate::on_both!(
                dev,
                vec![
                    act(randn(44, batch * classes, 3.0)),
                    act(randn(45, batch * classes, 3.0)),
                    act(vec![0.0; batch * classes]),
                    par(vec![0.25])
                ],
                |be, [s, t, ds, loss]| {
                    super::logit_loss(
                        be,
                        Outputs { ds, loss },
                        Logits {
                            student: s,
                            teacher: Some(t),
                            labels: &labels,
                        },
                        Rows::new(batch, classes),
                        &c,
                        0.5,
                    )
                    .unwrap();
                }
            );
            assert_close(
                &format!("logit loss {:?} {c:?}", dev.precision()),
                &gp,
                &cp,
                tol(dev.precision(), RED),
            );
        }
    }

    fn feature_loss_matches_the_cpu<D: Backend>(dev: &D) {
        let (rows, cols) = (197 * 3, 192);
        let (c, g) = crate::on_both!(
            dev,
            vec![
                act(randn(46, rows * cols, 1.0)),
                act(randn(47, rows * cols, 1.0)),
                act(randn(48, rows * cols, 1e-3)),
                par(vec![1.5])
            ],
            |be, [s, t, ds, loss]| {
                super::feature_loss(be, Outputs { ds, loss }, s, t, Rows::new(rows, cols), 0.7)
                    .unwrap();
            }
        );
        assert_close(
            &format!("feature loss {:?}", dev.precision()),
            &g,
            &c,
            tol(dev.precision(), RED),
        );
    }

    crate::on_every_device!(logit_loss_matches_the_cpu);
    crate::on_every_device!(feature_loss_matches_the_cpu);
}
