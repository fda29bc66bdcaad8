//! A linear layer, dense or low-rank, forward and backward side by side.
//!
//! Dense:    y = x Wᵀ + b                 W: [out, in]
//!           dW += dyᵀ x,  db += Σ_rows dy,  dx = dy W
//! Low-rank: h = x Vᵀ,  y = h Uᵀ + b      V: [r, in], U: [out, r]
//!           dU += dyᵀ h,  db += Σ_rows dy,  dh = dy U,
//!           dV += dhᵀ x,  dx = dh V
//!
//! `x` is `[rows, in]`, `y` and `dy` are `[rows, out]`, `h` and `dh` are
//! `[rows, r]`. A layer without a bias (q, k, v of some families) runs its
//! products alone and has no `db`. The input gradient is written, or added when the same input
//! feeds several layers (q, k and v all read the first LayerNorm's output):
//! `Flow::dx` carries its `Accumulate` mode.

use super::params::Linear;
use crate::ops::lowrank::{LowRankShape, LowRankWeights};
use crate::ops::matmul::{Accumulate, DenseShape, Gemm};
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

impl LinearShape {
    /// The dense layer of this shape on `rows` rows.
    pub fn dense(self, rows: usize) -> DenseShape {
        DenseShape {
            rows,
            inp: self.inp,
            out: self.out,
        }
    }

    /// The low-rank layer of this shape on `rows` rows (an error without a rank).
    pub fn low_rank(self, rows: usize) -> Result<LowRankShape> {
        let rank = self
            .rank
            .ok_or_else(|| anyhow::anyhow!("a low-rank layer needs its rank"))?;
        Ok(LowRankShape {
            rows,
            inp: self.inp,
            rank,
            out: self.out,
        })
    }
}

/// What a layer's backward pass reads of its forward pass: the input `x`
/// (`[rows, in]`) and, for a low-rank layer, the intermediate `h` (`[rows, r]`).
pub struct Saved<'a, T> {
    pub rows: usize,
    pub x: &'a T,
    pub h: Option<&'a T>,
}

/// The gradients flowing through a layer's backward pass: `dy` (`[rows,
/// out]`) in; the input gradient out to `dx` when given, written or added
/// (the same input can feed several layers); `dh` scratch of at least
/// `rows * r` for a low-rank layer.
pub struct Flow<'a, T> {
    pub dy: &'a T,
    pub dx: Option<(&'a mut T, Accumulate)>,
    pub dh: Option<&'a mut T>,
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
        Linear::Dense {
            weight,
            bias: Some(bias),
        } => matmul::linear_forward(be, y, x, weight, bias, shape.dense(rows)),
        // y[rows, out] = x W^T
        Linear::Dense { weight, bias: None } => matmul::matmul(
            be,
            y,
            x,
            weight,
            Gemm::new(rows, shape.out, shape.inp).b_t(),
        ),
        Linear::LowRank { u, v, bias } => {
            let h =
                h.ok_or_else(|| anyhow::anyhow!("a low-rank layer needs its intermediate buffer"))?;
            let s = shape.low_rank(rows)?;
            match bias {
                Some(bias) => lowrank::forward(be, y, h, x, LowRankWeights { v, u, bias }, s),
                None => {
                    // h[rows, r] = x Vᵀ,  y[rows, out] = h Uᵀ
                    matmul::matmul(be, h, x, v, Gemm::new(rows, s.rank, s.inp).b_t())?;
                    matmul::matmul(be, y, h, u, Gemm::new(rows, s.out, s.rank).b_t())
                }
            }
        }
    }
}

/// Backward: adds the parameter gradients to `grad`, and writes (or adds)
/// the input gradient to `f.dx` when given.
pub fn linear_backward<B: Backend>(
    be: &B,
    layer: &Linear<B::Buf>,
    grad: &mut Linear<B::Buf>,
    shape: LinearShape,
    saved: Saved<'_, B::Buf>,
    f: Flow<'_, B::Buf>,
) -> Result<()> {
    let (inp, out) = (shape.inp, shape.out);
    let Saved { rows, x, h } = saved;
    let Flow { dy, dx, dh } = f;
    match (layer, grad) {
        (
            Linear::Dense { weight, .. },
            Linear::Dense {
                weight: dw,
                bias: db,
            },
        ) => {
            // dW[out, in] += dyᵀ x
            matmul::matmul(be, dw, dy, x, Gemm::new(out, inp, rows).a_t().add())?;
            if let Some(db) = db {
                matmul::bias_backward(be, db, dy, rows, out)?;
            }
            if let Some((dx, mode)) = dx {
                // dx[rows, in] (+)= dy W
                matmul::matmul(be, dx, dy, weight, Gemm::new(rows, inp, out).with(mode))?;
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
            let r = shape.low_rank(rows)?.rank;
            let h = h.ok_or_else(|| {
                anyhow::anyhow!("a low-rank layer needs its forward intermediate")
            })?;
            let dh = dh.ok_or_else(|| anyhow::anyhow!("a low-rank layer needs scratch for dh"))?;
            // dU[out, r] += dyᵀ h,  db += Σ_rows dy,  dh[rows, r] = dy U,  dV[r, in] += dhᵀ x
            matmul::matmul(be, du, dy, h, Gemm::new(out, r, rows).a_t().add())?;
            if let Some(db) = db {
                matmul::bias_backward(be, db, dy, rows, out)?;
            }
            matmul::matmul(be, dh, dy, u, Gemm::new(rows, r, out))?;
            matmul::matmul(be, dv, dh, x, Gemm::new(r, inp, rows).a_t().add())?;
            if let Some((dx, mode)) = dx {
                // dx[rows, in] (+)= dh V
                matmul::matmul(be, dx, dh, v, Gemm::new(rows, inp, r).with(mode))?;
            }
        }
        _ => anyhow::bail!("gradient layout does not match the layer (dense vs low-rank)"),
    }
    Ok(())
}
