//! A linear layer, dense or low-rank, forward and backward side by side.
//!
//! Dense:    y = x Wᵀ + b                 W: [out, in]
//!           dW += dyᵀ x,  db += Σ_rows dy,  dx = dy W
//! Low-rank: h = x Vᵀ,  y = h Uᵀ + b      V: [r, in], U: [out, r]
//!           dU += dyᵀ h,  db += Σ_rows dy,  dh = dy U,
//!           dV += dhᵀ x,  dx = dh V
//!
//! `x` is `[rows, in]`, `y` and `dy` are `[rows, out]`, `h` and `dh` are
//! `[rows, r]`. The input gradient is written, or added when the same input
//! feeds several layers (q, k and v all read the first LayerNorm's output).

use super::params::Linear;
use crate::ops::{lowrank, matmul, Backend};
use anyhow::Result;

/// Shape of one linear layer.
#[derive(Clone, Copy, Debug)]
pub struct LinearShape {
    pub inp: usize,
    pub out: usize,
    /// `Some(r)` for a low-rank layer.
    pub rank: Option<usize>,
}

/// Forward: writes `y`; a low-rank layer also writes its intermediate `h`.
pub fn linear_forward<B: Backend>(
    be: &B,
    layer: &Linear<B::Buf>,
    shape: LinearShape,
    y: &mut B::Buf,
    h: Option<&mut B::Buf>,
    x: &B::Buf,
    rows: usize,
) -> Result<()> {
    match layer {
        Linear::Dense { weight, bias } => {
            matmul::linear_forward(be, y, x, weight, bias, rows, shape.inp, shape.out)
        }
        Linear::LowRank { u, v, bias } => {
            let h =
                h.ok_or_else(|| anyhow::anyhow!("a low-rank layer needs its intermediate buffer"))?;
            let r = shape
                .rank
                .ok_or_else(|| anyhow::anyhow!("a low-rank layer needs its rank"))?;
            lowrank::forward(be, y, h, x, v, u, bias, rows, shape.inp, r, shape.out)
        }
    }
}

/// Backward: adds the parameter gradients to `grad`, and writes (or, with
/// `accumulate_dx`, adds) the input gradient to `dx` when given.
/// `h` is the forward intermediate, `dh` scratch of at least `rows * r`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<B: Backend>(
    be: &B,
    layer: &Linear<B::Buf>,
    grad: &mut Linear<B::Buf>,
    shape: LinearShape,
    dx: Option<&mut B::Buf>,
    accumulate_dx: bool,
    dy: &B::Buf,
    x: &B::Buf,
    h: Option<&B::Buf>,
    dh: Option<&mut B::Buf>,
    rows: usize,
) -> Result<()> {
    let (inp, out) = (shape.inp, shape.out);
    match (layer, grad) {
        (
            Linear::Dense { weight, .. },
            Linear::Dense {
                weight: dw,
                bias: db,
            },
        ) => {
            matmul::matmul(be, dw, dy, x, out, inp, rows, true, false, true)?;
            matmul::bias_backward(be, db, dy, rows, out)?;
            if let Some(dx) = dx {
                matmul::matmul(
                    be,
                    dx,
                    dy,
                    weight,
                    rows,
                    inp,
                    out,
                    false,
                    false,
                    accumulate_dx,
                )?;
            }
        }
        (
            Linear::LowRank { u, v, .. },
            Linear::LowRank {
                u: du,
                v: dv,
                bias: db,
            },
        ) => {
            let r = shape
                .rank
                .ok_or_else(|| anyhow::anyhow!("a low-rank layer needs its rank"))?;
            let h = h.ok_or_else(|| {
                anyhow::anyhow!("a low-rank layer needs its forward intermediate")
            })?;
            let dh = dh.ok_or_else(|| anyhow::anyhow!("a low-rank layer needs scratch for dh"))?;
            matmul::matmul(be, du, dy, h, out, r, rows, true, false, true)?;
            matmul::bias_backward(be, db, dy, rows, out)?;
            matmul::matmul(be, dh, dy, u, rows, r, out, false, false, false)?;
            matmul::matmul(be, dv, dh, x, r, inp, rows, true, false, true)?;
            if let Some(dx) = dx {
                matmul::matmul(be, dx, dh, v, rows, inp, r, false, false, accumulate_dx)?;
            }
        }
        _ => anyhow::bail!("gradient layout does not match the layer (dense vs low-rank)"),
    }
    Ok(())
}
