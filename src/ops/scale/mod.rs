//! LayerScale (Touvron et al., CaiT; timm's `ls1.gamma` / `ls2.gamma`, used
//! by DeiT-III and DINOv2), a per-column scale of `[rows, cols]`, and a
//! scalar scale in place:
//!
//! ```text
//! forward   y[r, c] = x[r, c] · γ[c]
//! backward  dx[r, c] = dy[r, c] · γ[c]   (WRITES),   dγ[c] += Σ_r dy[r, c] · x[r, c]   (ADDS)
//! by        x[i] *= α                    (averaging two heads' logits)
//! ```
//! The input gradient is written, not added: LayerScale sits between a
//! branch's last linear layer and the residual sum, and the branch's
//! gradient has nowhere else to come from. γ and dγ are parameters (fp32 on
//! every device); x, y and their gradients are activations.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked, Rows};
use crate::device::Device;
use anyhow::{bail, Result};

/// What the backward pass writes: the input's gradient (written) and γ's
/// (added to).
pub struct Grads<'a, T> {
    pub dx: &'a mut T,
    pub dgamma: &'a mut T,
}

/// Device bodies of LayerScale and the scalar scale (call `forward`,
/// `backward`, `by`).
pub trait ScaleKernel: Device {
    fn scale_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        shape: Rows,
        _: Checked,
    ) -> Result<()>;
    fn scale_backward(
        &self,
        grads: Grads<'_, Self::Buf>,
        dy: &Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        shape: Rows,
        _: Checked,
    ) -> Result<()>;
    fn scale_by(&self, x: &mut Self::Buf, alpha: f32, len: usize, _: Checked) -> Result<()>;
}

/// Writes `out[r, c] = x[r, c] · gamma[c]` for the `rows` of `[rows, cols]`;
/// `gamma` is a parameter `[cols]`.
pub fn forward<D: ScaleKernel>(
    dev: &D,
    out: &mut D::Buf,
    x: &D::Buf,
    gamma: &D::Buf,
    rows: Rows,
) -> Result<()> {
    let n = rows.elements("scale")?;
    need(dev, "scale out", out, n)?;
    need(dev, "scale x", x, n)?;
    need(dev, "scale gamma", gamma, rows.cols)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(x, n), (out, n), (gamma, rows.cols)], n as f64));
    profiled(dev, "scale_forward", w, || {
        dev.scale_forward(out, x, gamma, rows, Checked::new())
    })
}

/// Backward of `forward`: WRITES `dx = dy · gamma` and ADDS
/// `dgamma[c] += Σ_r dy[r, c] · x[r, c]`; `x` is the forward's input.
pub fn backward<D: ScaleKernel>(
    dev: &D,
    dx: &mut D::Buf,
    dgamma: &mut D::Buf,
    dy: &D::Buf,
    x: &D::Buf,
    gamma: &D::Buf,
    rows: Rows,
) -> Result<()> {
    let n = rows.elements("scale")?;
    need(dev, "scale dx", dx, n)?;
    need(dev, "scale dy", dy, n)?;
    need(dev, "scale x", x, n)?;
    need(dev, "scale gamma", gamma, rows.cols)?;
    need(dev, "scale dgamma", dgamma, rows.cols)?;
    let cols = rows.cols;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[(dy, n), (x, n), (dx, n), (gamma, cols), (dgamma, 2 * cols)],
            3.0 * n as f64,
        )
    });
    profiled(dev, "scale_backward", w, || {
        dev.scale_backward(Grads { dx, dgamma }, dy, x, gamma, rows, Checked::new())
    })
}

/// Multiplies `x[i] *= alpha` in place for `i < len` (`x` an activation);
/// `alpha` must be finite.
pub fn by<D: ScaleKernel>(dev: &D, x: &mut D::Buf, alpha: f32, len: usize) -> Result<()> {
    if !alpha.is_finite() {
        bail!("scale by: the factor must be finite, got {alpha}");
    }
    need(dev, "scale by x", x, len)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(x, 2 * len)], len as f64));
    profiled(dev, "scale_by", w, || {
        dev.scale_by(x, alpha, len, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::{backward, by, forward};
    use crate::device::Cpu;
    use crate::ops::{Backend, Rows};
    use crate::testing::{
        act, assert_close, dot, each_buffer_short, fd_check, par, randn, random, tol, EW, RED,
    };

    const SHAPE: Rows = Rows { rows: 7, cols: 5 };

    #[test]
    fn forward_scales_each_column() {
        let x = [1.0, 2.0, 3.0, -1.0, -2.0, -3.0];
        let gamma = [10.0, 0.5, -1.0];
        let mut y = vec![f32::NAN; 7];
        forward(&Cpu, &mut y, &x.to_vec(), &gamma.to_vec(), Rows::new(2, 3)).unwrap();
        assert_eq!(&y[..6], &[10.0, 1.0, -3.0, -10.0, -1.0, 3.0]);
        assert!(y[6].is_nan(), "wrote past the rows");
    }

    /// dx is written (its old contents do not matter), dγ is added to, and
    /// both are the finite-difference gradients of Σ w·y.
    #[test]
    fn backward_matches_finite_differences() {
        let n = SHAPE.rows * SHAPE.cols;
        let (x, gamma, w) = (random(n, 1), random(SHAPE.cols, 2), random(n, 3));
        let (mut dx, mut dgamma) = (vec![f32::NAN; n], vec![0.25; SHAPE.cols]);
        backward(&Cpu, &mut dx, &mut dgamma, &w, &x, &gamma, SHAPE).unwrap();
        let loss = |x: &[f32], gamma: &[f32]| {
            let mut y = vec![0.0; n];
            forward(&Cpu, &mut y, &x.to_vec(), &gamma.to_vec(), SHAPE).unwrap();
            dot(&w, &y)
        };
        fd_check("scale dx", &x, &dx, n, |x| loss(x, &gamma));
        let dgamma: Vec<f32> = dgamma.iter().map(|g| g - 0.25).collect();
        fd_check("scale dgamma", &gamma, &dgamma, SHAPE.cols, |g| loss(&x, g));
    }

    #[test]
    fn by_scales_the_leading_elements_in_place() {
        let mut x = vec![1.0, -2.0, 4.0];
        by(&Cpu, &mut x, 0.5, 2).unwrap();
        assert_eq!(x, [0.5, -1.0, 4.0]);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let (n, c) = (SHAPE.rows * SHAPE.cols, SHAPE.cols);
        each_buffer_short("scale forward", &[n, n, c], 0.0, |b| {
            let [out, x, gamma] = b else { unreachable!() };
            forward(&Cpu, out, x, gamma, SHAPE)
        });
        each_buffer_short("scale backward", &[n, c, n, n, c], 0.0, |b| {
            let [dx, dgamma, dy, x, gamma] = b else {
                unreachable!()
            };
            backward(&Cpu, dx, dgamma, dy, x, gamma, SHAPE)
        });
        each_buffer_short("scale by", &[n], 0.0, |b| by(&Cpu, &mut b[0], 2.0, n));
        for alpha in [f32::NAN, f32::INFINITY] {
            assert!(by(&Cpu, &mut vec![0.0; 4], alpha, 4).is_err(), "{alpha}");
        }
        let huge = Rows::new(usize::MAX, 2);
        assert!(forward(&Cpu, &mut vec![], &vec![], &vec![0.0; 2], huge).is_err());
    }

    fn scale_matches_the_cpu<D: Backend>(dev: &D) {
        // Over 256 rows, so that CUDA sums dγ in more than one block.
        let shape = Rows::new(1000, 97);
        let n = shape.rows * shape.cols;
        let inputs = vec![
            act(randn(50, n, 1.0)),
            par(randn(51, shape.cols, 0.1)),
            act(vec![0.0; n]),
            act(randn(52, n, 1.0)),
            act(vec![0.0; n]),
            act(randn(54, n, 3.0)),
            par(randn(53, shape.cols, 1.0)),
        ];
        let (c, g) = crate::on_both!(dev, inputs, |be, [x, gamma, y, dy, dx, logits, dgamma]| {
            forward(be, y, x, gamma, shape).unwrap();
            backward(be, dx, dgamma, dy, x, gamma, shape).unwrap();
            by(be, logits, 0.5, n - 3).unwrap();
        });
        let p = dev.precision();
        assert_close(&format!("scale {p:?}"), &g[..6], &c[..6], tol(p, EW));
        // dγ sums 1000 products, in another order on a GPU.
        assert_close(
            &format!("scale dgamma {p:?}"),
            &g[6..],
            &c[6..],
            tol(p, RED),
        );
    }

    crate::on_every_device!(scale_matches_the_cpu);
}
