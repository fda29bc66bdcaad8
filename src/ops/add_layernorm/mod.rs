//! A residual add and the LayerNorm that reads it, as one op (pre-norm
//! blocks: `m = x + f(x)` feeds both the next residual and LN2):
//!
//! ```text
//! forward   s = a + b   (written: the residual stream),   y = LayerNorm(s)  (ops::layernorm)
//! backward  dx += LayerNorm_backward(dy)   (dx holds the gradient of s from its other use)
//!           dbranch = dx                   (the gradient of b; a's is dx itself)
//!           dγ += Σ dy ∘ x̂,  dβ += Σ dy
//! ```
//! The same numbers as `add::add` followed by `layernorm::forward`, and
//! `layernorm::backward` followed by a copy of `dx` (the CPU body is exactly
//! that); the CUDA kernels make one pass over the rows instead of three
//! (forward: a and b read, s and y written; backward: dy, s, dx read, dx
//! and dbranch written). The model uses it when its paths say so
//! (`ModelPaths::fused_add_layernorm`: `--fused-add-layernorm on` on CUDA,
//! never on the CPU).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::layernorm::{Params, Saved};
use super::{need, profiled, work, Checked, Rows};
use crate::device::Device;
use anyhow::{bail, Result};

/// What the forward pass writes: `sum[rows, cols] = a + b` (the residual
/// stream), its LayerNorm `out[rows, cols]`, and per row `mean[rows]` and
/// `rstd[rows]` (of `sum` as stored) for the backward pass.
pub struct Outputs<'a, B: ?Sized> {
    pub sum: &'a mut B,
    pub out: &'a mut B,
    pub mean: &'a mut B,
    pub rstd: &'a mut B,
}

/// The two terms of the residual add, `[rows, cols]` each.
pub struct Terms<'a, B: ?Sized> {
    pub a: &'a B,
    pub b: &'a B,
}

impl<B: ?Sized> Clone for Terms<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: ?Sized> Copy for Terms<'_, B> {}

/// The gradients of the backward pass: `dx` (ADDED to), `dbranch`
/// (WRITTEN, a copy of `dx`), both `[rows, cols]`; `dgamma`, `dbeta`
/// (ADDED to, `[cols]` each).
pub struct Grads<'a, B: ?Sized> {
    pub dx: &'a mut B,
    pub dbranch: &'a mut B,
    pub dgamma: &'a mut B,
    pub dbeta: &'a mut B,
}

/// Device bodies of the fused residual add + LayerNorm (call `forward` / `backward`).
pub trait AddLayerNormKernel: Device {
    fn add_layernorm_forward(
        &self,
        out: Outputs<'_, Self::Buf>,
        terms: Terms<'_, Self::Buf>,
        params: Params<'_, Self::Buf>,
        shape: Rows,
        eps: f32,
        _: Checked,
    ) -> Result<()>;
    fn add_layernorm_backward(
        &self,
        grads: Grads<'_, Self::Buf>,
        dout: &Self::Buf,
        saved: Saved<'_, Self::Buf>,
        gamma: &Self::Buf,
        shape: Rows,
        _: Checked,
    ) -> Result<()>;
}

/// Writes `out.sum = a + b` and its LayerNorm: `out.out`, and the per-row
/// `out.mean` and `out.rstd` (of `sum` as stored) for the backward pass.
pub fn forward<D: AddLayerNormKernel>(
    dev: &D,
    out: Outputs<'_, D::Buf>,
    terms: Terms<'_, D::Buf>,
    params: Params<'_, D::Buf>,
    shape: Rows,
    eps: f32,
) -> Result<()> {
    let Rows { rows, cols } = shape;
    let n = shape.elements("add_layernorm")?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("add_layernorm: eps must be positive, got {eps}");
    }
    for (name, buf) in [
        ("add_layernorm sum", &*out.sum),
        ("add_layernorm out", &*out.out),
        ("add_layernorm a", terms.a),
        ("add_layernorm b", terms.b),
    ] {
        need(dev, name, buf, n)?;
    }
    need(dev, "add_layernorm mean", out.mean, rows)?;
    need(dev, "add_layernorm rstd", out.rstd, rows)?;
    need(dev, "add_layernorm gamma", params.gamma, cols)?;
    need(dev, "add_layernorm beta", params.beta, cols)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (terms.a, n),
                (terms.b, n),
                (out.sum, n),
                (out.out, n),
                (params.gamma, cols),
                (params.beta, cols),
                (out.mean, rows),
                (out.rstd, rows),
            ],
            9.0 * n as f64,
        )
    });
    profiled(dev, "add_layernorm_forward", w, || {
        dev.add_layernorm_forward(out, terms, params, shape, eps, Checked::new())
    })
}

/// Backward of `forward` (`saved.x` is the forward's `sum`): ADDS the
/// LayerNorm's input gradient to `grads.dx` (which holds the gradient of
/// `sum` from its other use), then WRITES `grads.dbranch = grads.dx`; ADDS
/// the parameter gradients to `grads.dgamma`, `grads.dbeta`.
pub fn backward<D: AddLayerNormKernel>(
    dev: &D,
    grads: Grads<'_, D::Buf>,
    dout: &D::Buf,
    saved: Saved<'_, D::Buf>,
    gamma: &D::Buf,
    shape: Rows,
) -> Result<()> {
    let Rows { rows, cols } = shape;
    let n = shape.elements("add_layernorm")?;
    for (name, buf) in [
        ("add_layernorm dx", &*grads.dx),
        ("add_layernorm dbranch", &*grads.dbranch),
        ("add_layernorm dout", dout),
        ("add_layernorm sum", saved.x),
    ] {
        need(dev, name, buf, n)?;
    }
    need(dev, "add_layernorm mean", saved.mean, rows)?;
    need(dev, "add_layernorm rstd", saved.rstd, rows)?;
    for (name, buf) in [
        ("add_layernorm gamma", gamma),
        ("add_layernorm dgamma", &*grads.dgamma),
        ("add_layernorm dbeta", &*grads.dbeta),
    ] {
        need(dev, name, buf, cols)?;
    }
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (dout, n),
                (saved.x, n),
                (grads.dx, 2 * n),
                (grads.dbranch, n),
                (saved.mean, rows),
                (saved.rstd, rows),
                (gamma, cols),
                (grads.dgamma, 2 * cols),
                (grads.dbeta, 2 * cols),
            ],
            14.0 * n as f64,
        )
    });
    profiled(dev, "add_layernorm_backward", w, || {
        dev.add_layernorm_backward(grads, dout, saved, gamma, shape, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::{Grads, Outputs, Terms};
    use crate::device::Cpu;
    use crate::ops::layernorm::{self, Params, Saved};
    use crate::ops::{Backend, Rows};
    use crate::testing::{
        act, assert_close, dot, each_buffer_short, fd_check, par, randn, random, stat, tol, RED,
    };

    const R: usize = 5;
    const C: usize = 24;
    const N: usize = R * C;
    const SHAPE: Rows = Rows { rows: R, cols: C };

    /// (sum, out) of the CPU body.
    fn forward(a: &[f32], b: &[f32], g: &[f32], be: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut s, mut y, mut m, mut r) = (vec![0.0; N], vec![0.0; N], vec![0.0; R], vec![0.0; R]);
        super::forward(
            &Cpu,
            Outputs {
                sum: &mut s,
                out: &mut y,
                mean: &mut m,
                rstd: &mut r,
            },
            Terms {
                a: &a.to_vec(),
                b: &b.to_vec(),
            },
            Params {
                gamma: &g.to_vec(),
                beta: &be.to_vec(),
            },
            SHAPE,
            1e-6,
        )
        .unwrap();
        (s, y)
    }

    /// `L = w·y + v·s`: the gradient of both a and b is `v + LayerNorm_backward(w)`,
    /// which the backward pass leaves in dx (started at v) and in dbranch.
    #[test]
    fn backward_matches_finite_differences() {
        let (a, b, g, be) = (random(N, 1), random(N, 2), random(C, 3), random(C, 4));
        let (w, v) = (random(N, 5), random(N, 6));
        let loss = |a: &[f32], b: &[f32], g: &[f32], be: &[f32]| {
            let (s, y) = forward(a, b, g, be);
            dot(&w, &y) + dot(&v, &s)
        };
        let (mut s, mut y, mut m, mut r) = (vec![0.0; N], vec![0.0; N], vec![0.0; R], vec![0.0; R]);
        super::forward(
            &Cpu,
            Outputs {
                sum: &mut s,
                out: &mut y,
                mean: &mut m,
                rstd: &mut r,
            },
            Terms { a: &a, b: &b },
            Params {
                gamma: &g,
                beta: &be,
            },
            SHAPE,
            1e-6,
        )
        .unwrap();
        let (mut dx, mut dbranch, mut dg, mut db) =
            (v.clone(), vec![f32::NAN; N], vec![0.5; C], vec![0.5; C]);
        super::backward(
            &Cpu,
            Grads {
                dx: &mut dx,
                dbranch: &mut dbranch,
                dgamma: &mut dg,
                dbeta: &mut db,
            },
            &w,
            Saved {
                x: &s,
                mean: &m,
                rstd: &r,
            },
            &g,
            SHAPE,
        )
        .unwrap();
        assert_eq!(dx, dbranch, "dbranch is a copy of dx");
        let (dg, db): (Vec<f32>, Vec<f32>) = (
            dg.iter().map(|x| x - 0.5).collect(),
            db.iter().map(|x| x - 0.5).collect(),
        );
        fd_check("add_layernorm da", &a, &dx, 60, |a| loss(a, &b, &g, &be));
        fd_check("add_layernorm db", &b, &dbranch, 60, |b| {
            loss(&a, b, &g, &be)
        });
        fd_check("add_layernorm dgamma", &g, &dg, C, |g| loss(&a, &b, g, &be));
        fd_check("add_layernorm dbeta", &be, &db, C, |be| {
            loss(&a, &b, &g, be)
        });
    }

    /// The CPU body is `add` then `layernorm`, bit for bit.
    #[test]
    fn equals_add_then_layernorm() {
        let (a, b, g, be) = (random(N, 7), random(N, 8), random(C, 9), random(C, 10));
        let (s, y) = forward(&a, &b, &g, &be);
        let mut s2 = vec![0.0; N];
        crate::ops::add::add(&Cpu, &mut s2, &a, &b, N).unwrap();
        let (mut y2, mut m2, mut r2) = (vec![0.0; N], vec![0.0; R], vec![0.0; R]);
        layernorm::forward(
            &Cpu,
            layernorm::Outputs {
                out: &mut y2,
                mean: &mut m2,
                rstd: &mut r2,
            },
            &s2,
            Params {
                gamma: &g,
                beta: &be,
            },
            SHAPE,
            1e-6,
        )
        .unwrap();
        assert_eq!((s, y), (s2, y2));
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let (rows, cols) = (3, 4);
        let n = rows * cols;
        let lens = [n, n, rows, rows, n, n, cols, cols];
        each_buffer_short("forward", &lens, 1.0, |b| {
            let [s, out, mean, rstd, x, y, g, be] = b else {
                unreachable!()
            };
            super::forward(
                &Cpu,
                Outputs {
                    sum: s,
                    out,
                    mean,
                    rstd,
                },
                Terms { a: x, b: y },
                Params { gamma: g, beta: be },
                Rows { rows, cols },
                1e-6,
            )
        });
        let lens = [n, n, cols, cols, n, n, rows, rows, cols];
        each_buffer_short("backward", &lens, 1.0, |b| {
            let [dx, dbr, dg, db, dout, s, mean, rstd, g] = b else {
                unreachable!()
            };
            super::backward(
                &Cpu,
                Grads {
                    dx,
                    dbranch: dbr,
                    dgamma: dg,
                    dbeta: db,
                },
                dout,
                Saved { x: s, mean, rstd },
                g,
                Rows { rows, cols },
            )
        });
        let mut b = vec![vec![0.0f32; n]; 8];
        let [s, out, mean, rstd, x, y, g, be] = b.as_mut_slice() else {
            unreachable!()
        };
        assert!(
            super::forward(
                &Cpu,
                Outputs {
                    sum: s,
                    out,
                    mean,
                    rstd,
                },
                Terms { a: x, b: y },
                Params { gamma: g, beta: be },
                Rows { rows, cols },
                f32::NAN,
            )
            .is_err(),
            "eps NaN"
        );
    }

    fn forward_and_backward_match_the_cpu<D: Backend>(dev: &D) {
        // Even widths take the paired-column loops, odd ones the scalar loops.
        for (rows, cols) in [(517, 768), (33, 45)] {
            let n = rows * cols;
            let mut a = randn(31, n, 2.0);
            for v in a.iter_mut().step_by(7) {
                *v += 5.0;
            }
            let gamma: Vec<f32> = randn(32, cols, 0.3).iter().map(|v| 1.0 + v).collect();
            let nan = || act(vec![f32::NAN; n]);
            let inputs = vec![
                act(a),
                act(randn(33, n, 1.0)),
                par(gamma),
                par(randn(34, cols, 0.5)),
                nan(),
                nan(),
                stat(vec![f32::NAN; rows]),
                stat(vec![f32::NAN; rows]),
                act(randn(35, n, 1.0)),
                act(randn(36, n, 1.0)),
                nan(),
                par(randn(37, cols, 1.0)),
                par(randn(38, cols, 1.0)),
            ];
            let (c, g) = crate::on_both!(dev, inputs, |be, [a, b, gamma, beta, sum, out, mean, rstd, dout, dx, dbranch, dgamma, dbeta]| {
                let shape = Rows { rows, cols };
                let out = Outputs { sum, out, mean, rstd };
                super::forward(be, out, Terms { a, b }, Params { gamma, beta }, shape, 1e-6).unwrap();
                let (grads, saved) = (Grads { dx, dbranch, dgamma, dbeta }, Saved { x: sum, mean, rstd });
                super::backward(be, grads, dout, saved, gamma, shape).unwrap();
            });
            assert_close(
                &format!("add_layernorm {:?} [{rows}, {cols}]", dev.precision()),
                &g,
                &c,
                tol(dev.precision(), RED),
            );
        }
    }

    crate::on_every_device!(forward_and_backward_match_the_cpu);
}
