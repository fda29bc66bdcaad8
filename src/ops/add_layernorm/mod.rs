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

use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::{bail, Result};

/// Device bodies of the fused residual add + LayerNorm (call `forward` / `backward`).
pub trait AddLayerNormKernel: Device {
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_forward(
        &self,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
        _: Checked,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm_backward(
        &self,
        dx: &mut Self::Buf,
        dbranch: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dout: &Self::Buf,
        sum: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
        _: Checked,
    ) -> Result<()>;
}

/// Writes `sum = a + b` and its LayerNorm: `out`, and the per-row `mean`
/// and `rstd` (of `sum` as stored) for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn forward<D: AddLayerNormKernel>(
    dev: &D,
    sum: &mut D::Buf,
    out: &mut D::Buf,
    mean: &mut D::Buf,
    rstd: &mut D::Buf,
    a: &D::Buf,
    b: &D::Buf,
    gamma: &D::Buf,
    beta: &D::Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    let n = product("add_layernorm", &[rows, cols])?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("add_layernorm: eps must be positive, got {eps}");
    }
    for (name, buf) in [
        ("add_layernorm sum", &*sum),
        ("add_layernorm out", &*out),
        ("add_layernorm a", a),
        ("add_layernorm b", b),
    ] {
        need(dev, name, buf, n)?;
    }
    need(dev, "add_layernorm mean", mean, rows)?;
    need(dev, "add_layernorm rstd", rstd, rows)?;
    need(dev, "add_layernorm gamma", gamma, cols)?;
    need(dev, "add_layernorm beta", beta, cols)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (a, n),
                (b, n),
                (sum, n),
                (out, n),
                (gamma, cols),
                (beta, cols),
                (mean, rows),
                (rstd, rows),
            ],
            9.0 * n as f64,
        )
    });
    profiled(dev, "add_layernorm_forward", w, || {
        dev.add_layernorm_forward(
            sum,
            out,
            mean,
            rstd,
            a,
            b,
            gamma,
            beta,
            rows,
            cols,
            eps,
            Checked::new(),
        )
    })
}

/// Backward of `forward`: ADDS the LayerNorm's input gradient to `dx` (which
/// holds the gradient of `sum` from its other use), then WRITES
/// `dbranch = dx`; ADDS the parameter gradients to `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn backward<D: AddLayerNormKernel>(
    dev: &D,
    dx: &mut D::Buf,
    dbranch: &mut D::Buf,
    dgamma: &mut D::Buf,
    dbeta: &mut D::Buf,
    dout: &D::Buf,
    sum: &D::Buf,
    mean: &D::Buf,
    rstd: &D::Buf,
    gamma: &D::Buf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = product("add_layernorm", &[rows, cols])?;
    for (name, buf) in [
        ("add_layernorm dx", &*dx),
        ("add_layernorm dbranch", &*dbranch),
        ("add_layernorm dout", dout),
        ("add_layernorm sum", sum),
    ] {
        need(dev, name, buf, n)?;
    }
    need(dev, "add_layernorm mean", mean, rows)?;
    need(dev, "add_layernorm rstd", rstd, rows)?;
    for (name, buf) in [
        ("add_layernorm gamma", gamma),
        ("add_layernorm dgamma", &*dgamma),
        ("add_layernorm dbeta", &*dbeta),
    ] {
        need(dev, name, buf, cols)?;
    }
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (dout, n),
                (sum, n),
                (dx, 2 * n),
                (dbranch, n),
                (mean, rows),
                (rstd, rows),
                (gamma, cols),
                (dgamma, 2 * cols),
                (dbeta, 2 * cols),
            ],
            14.0 * n as f64,
        )
    });
    profiled(dev, "add_layernorm_backward", w, || {
        dev.add_layernorm_backward(
            dx,
            dbranch,
            dgamma,
            dbeta,
            dout,
            sum,
            mean,
            rstd,
            gamma,
            rows,
            cols,
            Checked::new(),
        )
    })
}

#[cfg(test)]
mod tests {
    use crate::device::Cpu;
    use crate::ops::Backend;
    use crate::testing::{
        act, assert_close, dot, each_buffer_short, fd_check, par, randn, random, stat, tol, RED,
    };

    const R: usize = 5;
    const C: usize = 24;
    const N: usize = R * C;

    /// (sum, out) of the CPU body.
    fn forward(a: &[f32], b: &[f32], g: &[f32], be: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut s, mut y, mut m, mut r) = (vec![0.0; N], vec![0.0; N], vec![0.0; R], vec![0.0; R]);
        super::forward(
            &Cpu,
            &mut s,
            &mut y,
            &mut m,
            &mut r,
            &a.to_vec(),
            &b.to_vec(),
            &g.to_vec(),
            &be.to_vec(),
            R,
            C,
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
            &Cpu, &mut s, &mut y, &mut m, &mut r, &a, &b, &g, &be, R, C, 1e-6,
        )
        .unwrap();
        let (mut dx, mut dbranch, mut dg, mut db) =
            (v.clone(), vec![f32::NAN; N], vec![0.5; C], vec![0.5; C]);
        super::backward(
            &Cpu,
            &mut dx,
            &mut dbranch,
            &mut dg,
            &mut db,
            &w,
            &s,
            &m,
            &r,
            &g,
            R,
            C,
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
        crate::ops::layernorm::forward(&Cpu, &mut y2, &mut m2, &mut r2, &s2, &g, &be, R, C, 1e-6)
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
            super::forward(&Cpu, s, out, mean, rstd, x, y, g, be, rows, cols, 1e-6)
        });
        let lens = [n, n, cols, cols, n, n, rows, rows, cols];
        each_buffer_short("backward", &lens, 1.0, |b| {
            let [dx, dbr, dg, db, dout, s, mean, rstd, g] = b else {
                unreachable!()
            };
            super::backward(&Cpu, dx, dbr, dg, db, dout, s, mean, rstd, g, rows, cols)
        });
        let mut b = vec![vec![0.0f32; n]; 8];
        let [s, out, mean, rstd, x, y, g, be] = b.as_mut_slice() else {
            unreachable!()
        };
        assert!(
            super::forward(&Cpu, s, out, mean, rstd, x, y, g, be, rows, cols, f32::NAN).is_err(),
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
                super::forward(be, sum, out, mean, rstd, a, b, gamma, beta, rows, cols, 1e-6).unwrap();
                super::backward(be, dx, dbranch, dgamma, dbeta, dout, sum, mean, rstd, gamma, rows, cols).unwrap();
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
