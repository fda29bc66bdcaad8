//! LayerNorm on the CPU: rows in parallel (16 per forward task, 64 per
//! backward task); per-row sums in 32 f32 lanes combined in f64
//! (vectorized, deterministic); parameter gradients summed per 64-row chunk
//! in the backward's own pass, chunks combined in order.

use super::{Grads, LayerNormKernel, Outputs, Params, Saved};
use crate::device::Cpu;
use crate::ops::matmul::cpu::{sum_in_order, ROW_CHUNK};
use crate::ops::simd::{fold_pairwise, vectorized};
use crate::ops::{Checked, Rows};
use anyhow::Result;
use rayon::prelude::*;

pub fn layernorm_forward(
    out: Outputs<'_, [f32]>,
    x: &[f32],
    params: Params<'_, [f32]>,
    shape: Rows,
    eps: f32,
) {
    let (Outputs { out, mean, rstd }, Params { gamma, beta }) = (out, params);
    let Rows { rows, cols } = shape;
    // Exactly `cols` long, so that indexing inside the loops needs no bounds checks.
    let (gamma, beta) = (&gamma[..cols], &beta[..cols]);
    let task = cols * ROWS_PER_TASK;
    out[..rows * cols]
        .par_chunks_mut(task)
        .zip(x[..rows * cols].par_chunks(task))
        .zip(
            mean[..rows]
                .par_chunks_mut(ROWS_PER_TASK)
                .zip(rstd[..rows].par_chunks_mut(ROWS_PER_TASK)),
        )
        .for_each(|((o, x), (m, r))| {
            vectorized(
                #[inline(always)]
                || {
                    for (((o, x), m), r) in o
                        .chunks_mut(cols)
                        .zip(x.chunks(cols))
                        .zip(m.iter_mut())
                        .zip(r.iter_mut())
                    {
                        let x = &x[..cols];
                        let mu = (lane_sum(x, x, x, |x, _, _| x) / cols as f64) as f32;
                        let var = lane_sum(x, x, x, |x, _, _| (x - mu) * (x - mu)) / cols as f64;
                        let rs = (1.0 / (var + eps as f64).sqrt()) as f32;
                        for (((o, &x), &g), &b) in o.iter_mut().zip(x).zip(gamma).zip(beta) {
                            *o = (x - mu) * rs * g + b;
                        }
                        *m = mu;
                        *r = rs;
                    }
                },
            )
        });
}

/// Rows per rayon task and per entry into the vectorized code: at width 64
/// a row is a few dozen instructions, less than handing it to a thread.
const ROWS_PER_TASK: usize = 16;

/// ADDS the input gradient to `dx` and the parameter gradients to
/// `dgamma`, `dbeta`, in one pass over the rows: each task takes a chunk
/// of `ROW_CHUNK` rows, writes their `dx` and sums the chunk's dγ and dβ in
/// f32 (rows in order, the inner loop over columns vectorized); the chunks
/// are then added in order in f64, as `column_sums` does, so the result
/// does not depend on the thread count. Before, dγ and dβ were two more
/// passes (`column_sums`) over `dout` and `x`; the sums are the same
/// expressions in the same order, so the bits did not change.
pub fn layernorm_backward(
    grads: Grads<'_, [f32]>,
    dout: &[f32],
    saved: Saved<'_, [f32]>,
    gamma: &[f32],
    shape: Rows,
) {
    let (Grads { dx, dgamma, dbeta }, Saved { x, mean, rstd }) = (grads, saved);
    let Rows { rows, cols } = shape;
    let gamma = &gamma[..cols];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx[..rows * cols]
        .par_chunks_mut(cols * ROW_CHUNK)
        .enumerate()
        .map(|(chunk, dx)| {
            let (mut dg, mut db) = (vec![0f32; cols], vec![0f32; cols]);
            vectorized(
                #[inline(always)]
                || {
                    for (i, dx) in dx.chunks_mut(cols).enumerate() {
                        let r = chunk * ROW_CHUNK + i;
                        let (x, g) = (
                            &x[r * cols..(r + 1) * cols],
                            &dout[r * cols..(r + 1) * cols],
                        );
                        let (mu, rs) = (mean[r], rstd[r]);
                        let mean_dn =
                            (lane_sum(g, gamma, g, |g, gamma, _| g * gamma) / cols as f64) as f32;
                        let mean_dn_xhat =
                            (lane_sum(g, gamma, x, |g, gamma, x| g * gamma * (x - mu) * rs)
                                / cols as f64) as f32;
                        for (((((dx, &x), &g), &gamma), dg), db) in dx
                            .iter_mut()
                            .zip(x)
                            .zip(g)
                            .zip(gamma)
                            .zip(dg.iter_mut())
                            .zip(db.iter_mut())
                        {
                            let xhat = (x - mu) * rs;
                            *dx += rs * (g * gamma - mean_dn - xhat * mean_dn_xhat);
                            *dg += g * (x - mu) * rs;
                            *db += g;
                        }
                    }
                },
            );
            (dg, db)
        })
        .collect();
    let (pg, pb): (Vec<_>, Vec<_>) = partials.into_iter().unzip();
    let (dg, db) = (sum_in_order(pg, cols), sum_in_order(pb, cols));
    for j in 0..cols {
        dgamma[j] += dg[j] as f32;
        dbeta[j] += db[j] as f32;
    }
}

/// Lanes of `lane_sum`: two AVX-512 registers (four AVX2, eight SSE), so
/// that consecutive additions do not wait on each other. With 8 lanes and
/// index-based access (bounds checks) the sums compiled to scalar code:
/// `cargo bench --bench cpu_ops` (400 × 768, two threads) forward
/// 0.385-0.394 → 0.164-0.226 ns per element, backward 1.01-1.07 → 0.39.
const LANES: usize = 32;

/// `Σ f(a[i], b[i], c[i])` over the row (`b`, `c` at least as long as `a`;
/// pass `a` again where fewer inputs are needed) in 32 independent f32
/// lanes, so that the loop vectorizes and the fixed lane order keeps it
/// deterministic; lanes and tail are added in f64.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f64 {
    let n = a.len();
    let ((a, a_tail), (b, b_tail), (c, c_tail)) = (
        a.as_chunks::<LANES>(),
        b[..n].as_chunks::<LANES>(),
        c[..n].as_chunks::<LANES>(),
    );
    let mut lanes = [0f32; LANES];
    for ((a, b), c) in a.iter().zip(b).zip(c) {
        for l in 0..LANES {
            lanes[l] += f(a[l], b[l], c[l]);
        }
    }
    let tail: f64 = a_tail
        .iter()
        .zip(b_tail)
        .zip(c_tail)
        .map(|((&a, &b), &c)| f(a, b, c) as f64)
        .sum();
    // Folded pairwise in f64: 32 dependent additions one after the other
    // were most of a row's time at width 64 (`--profile`: LayerNorm
    // forward 77 ns per 64-wide row on one thread, 9% of a small model's
    // distillation step).
    fold_pairwise(lanes.map(|v| v as f64), |x, y| x + y) + tail
}

impl LayerNormKernel for Cpu {
    fn layernorm_forward(
        &self,
        out: Outputs<'_, Vec<f32>>,
        x: &Vec<f32>,
        params: Params<'_, Vec<f32>>,
        shape: Rows,
        eps: f32,
        _: Checked,
    ) -> Result<()> {
        layernorm_forward(out.slices(), x, params.slices(), shape, eps);
        Ok(())
    }
    fn layernorm_backward(
        &self,
        grads: Grads<'_, Vec<f32>>,
        dout: &Vec<f32>,
        saved: Saved<'_, Vec<f32>>,
        gamma: &Vec<f32>,
        shape: Rows,
        _: Checked,
    ) -> Result<()> {
        layernorm_backward(grads.slices(), dout, saved.slices(), gamma, shape);
        Ok(())
    }
}

impl<'a> Outputs<'a, Vec<f32>> {
    /// The same buffers as slices, for the reference loops.
    pub fn slices(self) -> Outputs<'a, [f32]> {
        Outputs {
            out: self.out,
            mean: self.mean,
            rstd: self.rstd,
        }
    }
}

impl<'a> Params<'a, Vec<f32>> {
    /// The same buffers as slices, for the reference loops.
    pub fn slices(self) -> Params<'a, [f32]> {
        Params {
            gamma: self.gamma,
            beta: self.beta,
        }
    }
}

impl<'a> Saved<'a, Vec<f32>> {
    /// The same buffers as slices, for the reference loops.
    pub fn slices(self) -> Saved<'a, [f32]> {
        Saved {
            x: self.x,
            mean: self.mean,
            rstd: self.rstd,
        }
    }
}

impl<'a> Grads<'a, Vec<f32>> {
    /// The same buffers as slices, for the reference loops.
    pub fn slices(self) -> Grads<'a, [f32]> {
        Grads {
            dx: self.dx,
            dgamma: self.dgamma,
            dbeta: self.dbeta,
        }
    }
}
