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

use super::{need, profiled, work, Checked, Rows};
use crate::device::Device;
use anyhow::{bail, Result};

/// What the forward pass writes: `out[rows, cols]` and, per row,
/// `mean[rows]` and `rstd[rows]` for the backward pass.
pub struct Outputs<'a, B: ?Sized> {
    pub out: &'a mut B,
    pub mean: &'a mut B,
    pub rstd: &'a mut B,
}

/// What the backward pass reads of its forward pass: the input
/// `x[rows, cols]` and its per-row `mean`, `rstd`.
pub struct Saved<'a, B: ?Sized> {
    pub x: &'a B,
    pub mean: &'a B,
    pub rstd: &'a B,
}

impl<B: ?Sized> Clone for Saved<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Saved<'_, B> {}

/// The affine parameters γ and β, `[cols]` each.
pub struct Params<'a, B: ?Sized> {
    pub gamma: &'a B,
    pub beta: &'a B,
}

impl<B: ?Sized> Clone for Params<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Params<'_, B> {}

/// The gradients the backward pass ADDS to: `dx[rows, cols]` and
/// `dgamma`, `dbeta` (`[cols]` each).
pub struct Grads<'a, B: ?Sized> {
    pub dx: &'a mut B,
    pub dgamma: &'a mut B,
    pub dbeta: &'a mut B,
}

/// Device bodies of LayerNorm (call `forward` / `backward`).
pub trait LayerNormKernel: Device {
    fn layernorm_forward(
        &self,
        out: Outputs<'_, Self::Buf>,
        x: &Self::Buf,
        params: Params<'_, Self::Buf>,
        shape: Rows,
        eps: f32,
        _: Checked,
    ) -> Result<()>;
    fn layernorm_backward(
        &self,
        grads: Grads<'_, Self::Buf>,
        dout: &Self::Buf,
        saved: Saved<'_, Self::Buf>,
        gamma: &Self::Buf,
        shape: Rows,
        _: Checked,
    ) -> Result<()>;
}

/// LayerNorm over the last axis of `x[rows, cols]`: writes `out.out`, and
/// the per-row `out.mean[rows]` and `out.rstd[rows] = 1/sqrt(var + eps)`
/// (biased variance, computed in two passes) for the backward pass.
pub fn forward<D: LayerNormKernel>(
    dev: &D,
    out: Outputs<'_, D::Buf>,
    x: &D::Buf,
    params: Params<'_, D::Buf>,
    shape: Rows,
    eps: f32,
) -> Result<()> {
    let Rows { rows, cols } = shape;
    let n = shape.elements("layernorm")?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("layernorm: eps must be positive, got {eps}");
    }
    need(dev, "layernorm out", out.out, n)?;
    need(dev, "layernorm x", x, n)?;
    need(dev, "layernorm mean", out.mean, rows)?;
    need(dev, "layernorm rstd", out.rstd, rows)?;
    need(dev, "layernorm gamma", params.gamma, cols)?;
    need(dev, "layernorm beta", params.beta, cols)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (x, n),
                (out.out, n),
                (params.gamma, cols),
                (params.beta, cols),
                (out.mean, rows),
                (out.rstd, rows),
            ],
            8.0 * n as f64,
        )
    });
    profiled(dev, "layernorm_forward", w, || {
        dev.layernorm_forward(out, x, params, shape, eps, Checked::new())
    })
}

/// LayerNorm backward: ADDS the input gradient to `grads.dx` (the residual
/// stream's gradient already lives there) and the parameter gradients to
/// `grads.dgamma`, `grads.dbeta`.
pub fn backward<D: LayerNormKernel>(
    dev: &D,
    grads: Grads<'_, D::Buf>,
    dout: &D::Buf,
    saved: Saved<'_, D::Buf>,
    gamma: &D::Buf,
    shape: Rows,
) -> Result<()> {
    let ok = check_backward(dev, &grads, dout, saved, gamma, shape)?;
    let Rows { rows, cols } = shape;
    let n = rows * cols;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (dout, n),
                (saved.x, n),
                (grads.dx, 2 * n),
                (saved.mean, rows),
                (saved.rstd, rows),
                (gamma, cols),
                (grads.dgamma, 2 * cols),
                (grads.dbeta, 2 * cols),
            ],
            14.0 * n as f64,
        )
    });
    profiled(dev, "layernorm_backward", w, || {
        dev.layernorm_backward(grads, dout, saved, gamma, shape, ok)
    })
}

/// The checks of `backward`, for callers that time a device's kernels one
/// by one (the CUDA bench): the token they need to call them.
pub fn check_backward<D: Device>(
    dev: &D,
    grads: &Grads<'_, D::Buf>,
    dout: &D::Buf,
    saved: Saved<'_, D::Buf>,
    gamma: &D::Buf,
    shape: Rows,
) -> Result<Checked> {
    let Rows { rows, cols } = shape;
    let n = shape.elements("layernorm")?;
    need(dev, "layernorm dx", grads.dx, n)?;
    need(dev, "layernorm dout", dout, n)?;
    need(dev, "layernorm x", saved.x, n)?;
    need(dev, "layernorm mean", saved.mean, rows)?;
    need(dev, "layernorm rstd", saved.rstd, rows)?;
    need(dev, "layernorm gamma", gamma, cols)?;
    need(dev, "layernorm dgamma", grads.dgamma, cols)?;
    need(dev, "layernorm dbeta", grads.dbeta, cols)?;
    Ok(Checked::new())
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{Grads, Outputs, Params, Saved};
    use crate::device::Cpu;
    use crate::ops::{Backend, Rows};
    use crate::testing::{
        act, assert_close, dot, each_buffer_short, fd_check, par, randn, random, stat, tol, RED,
    };

    const R: usize = 5;
    const C: usize = 24;
    const SHAPE: Rows = Rows { rows: R, cols: C };

    fn forward(x: &[f32], g: &[f32], b: &[f32]) -> Vec<f32> {
        let (mut y, mut m, mut r) = (vec![0.0; R * C], vec![0.0; R], vec![0.0; R]);
        layernorm_forward(
            Outputs {
                out: &mut y,
                mean: &mut m,
                rstd: &mut r,
            },
            x,
            Params { gamma: g, beta: b },
            SHAPE,
            1e-6,
        );
        y
    }

    #[test]
    fn rows_are_normalized() {
        let x: Vec<f32> = random(R * C, 1).iter().map(|v| 3.0 * v + 7.0).collect();
        let y = forward(&x, &[1.0; C], &[0.0; C]);
        for row in y.chunks(C) {
            let mean: f32 = row.iter().sum::<f32>() / C as f32;
            let var: f32 = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / C as f32;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "mean {mean} var {var}"
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences_and_adds() {
        let (x, g, b, w) = (
            random(R * C, 1),
            random(C, 2),
            random(C, 3),
            random(R * C, 4),
        );
        let (mut y, mut m, mut r) = (vec![0.0; R * C], vec![0.0; R], vec![0.0; R]);
        layernorm_forward(
            Outputs {
                out: &mut y,
                mean: &mut m,
                rstd: &mut r,
            },
            &x,
            Params {
                gamma: &g,
                beta: &b,
            },
            SHAPE,
            1e-6,
        );
        let prior = random(R * C, 5);
        let (mut dx, mut dg, mut db) = (prior.clone(), vec![0.5; C], vec![0.5; C]);
        layernorm_backward(
            Grads {
                dx: &mut dx,
                dgamma: &mut dg,
                dbeta: &mut db,
            },
            &w,
            Saved {
                x: &x,
                mean: &m,
                rstd: &r,
            },
            &g,
            SHAPE,
        );
        let dx_only: Vec<f32> = dx.iter().zip(&prior).map(|(a, p)| a - p).collect();
        let dg_only: Vec<f32> = dg.iter().map(|v| v - 0.5).collect();
        let db_only: Vec<f32> = db.iter().map(|v| v - 0.5).collect();
        fd_check("layernorm dx", &x, &dx_only, 60, |x| {
            dot(&w, &forward(x, &g, &b))
        });
        fd_check("layernorm dgamma", &g, &dg_only, C, |g| {
            dot(&w, &forward(&x, g, &b))
        });
        fd_check("layernorm dbeta", &b, &db_only, C, |b| {
            dot(&w, &forward(&x, &g, b))
        });
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let (rows, cols) = (3, 4);
        let n = rows * cols;
        let lens = [n, rows, rows, n, cols, cols];
        each_buffer_short("forward", &lens, 1.0, |b| {
            let [out, mean, rstd, x, g, be] = b else {
                unreachable!()
            };
            super::forward(
                &Cpu,
                Outputs { out, mean, rstd },
                x,
                Params { gamma: g, beta: be },
                Rows { rows, cols },
                1e-6,
            )
        });
        let lens = [n, cols, cols, n, n, rows, rows, cols];
        each_buffer_short("backward", &lens, 1.0, |b| {
            let [dx, dg, db, dout, x, mean, rstd, g] = b else {
                unreachable!()
            };
            super::backward(
                &Cpu,
                Grads {
                    dx,
                    dgamma: dg,
                    dbeta: db,
                },
                dout,
                Saved { x, mean, rstd },
                g,
                Rows { rows, cols },
            )
        });
        let mut b = vec![vec![0.0f32; n]; 6];
        let [out, mean, rstd, x, g, be] = b.as_mut_slice() else {
            unreachable!()
        };
        assert!(
            super::forward(
                &Cpu,
                Outputs { out, mean, rstd },
                x,
                Params { gamma: g, beta: be },
                Rows { rows, cols },
                0.0
            )
            .is_err(),
            "eps 0"
        );
    }

    fn forward_and_backward_match_the_cpu<D: Backend>(dev: &D) {
        // Even widths take the paired-column path of the backward kernel, odd ones the scalar loop.
        for (rows, cols) in [(517, 768), (33, 45)] {
            let mut x = randn(19, rows * cols, 2.0);
            for v in x.iter_mut().step_by(7) {
                *v += 5.0;
            }
            let gamma: Vec<f32> = randn(20, cols, 0.3).iter().map(|v| 1.0 + v).collect();
            let inputs = vec![
                act(x.clone()),
                par(gamma.clone()),
                par(randn(21, cols, 0.5)),
                act(vec![0.0; rows * cols]),
                stat(vec![0.0; rows]),
                stat(vec![0.0; rows]),
                act(randn(22, rows * cols, 1.0)),
                act(randn(23, rows * cols, 1.0)),
                par(randn(24, cols, 1.0)),
                par(randn(25, cols, 1.0)),
            ];
            let (c, g) = crate::on_both!(
                dev,
                inputs,
                |be, [x, gamma, beta, out, mean, rstd, dout, dx, dgamma, dbeta]| {
                    let shape = Rows { rows, cols };
                    super::forward(
                        be,
                        Outputs { out, mean, rstd },
                        x,
                        Params { gamma, beta },
                        shape,
                        1e-6,
                    )
                    .unwrap();
                    super::backward(
                        be,
                        Grads { dx, dgamma, dbeta },
                        dout,
                        Saved { x, mean, rstd },
                        gamma,
                        shape,
                    )
                    .unwrap();
                }
            );
            assert_close(
                &format!("layernorm {:?} [{rows}, {cols}]", dev.precision()),
                &g,
                &c,
                tol(dev.precision(), RED),
            );
        }
    }

    crate::on_every_device!(forward_and_backward_match_the_cpu);
}
