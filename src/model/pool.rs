//! From the final residual stream to the logits, forward and backward side
//! by side, for each pooling of `model::family::Pool`:
//!
//! ```text
//! Class         c = x[:, 0];  logits = head(LN(c))
//!   backward    dx[:, 0] = LNᵀ(headᵀ(dlogits))
//! Average       c = mean_{patches} x;  logits = head(LN(c))             (LN: fc_norm)
//!   backward    dx[:, patch] = LNᵀ(headᵀ(dlogits)) / patches
//! Distilled     logits = (head(LN(x[:, 0])) + head_dist(LN(x[:, 1]))) / 2
//!   backward    each head and LN from dlogits / 2, into rows 0 and 1
//! ClassAndMean  y = LN(x) on every token;  c = [y[:, 0] ; mean_{patches} y];  logits = head(c)
//!   backward    dc split: its first half into row 0 of dy, its second spread over the
//!               patches; then LN's backward on every token
//! ```
//! Every pooling but `Class` reads more than the class token, so the
//! class-token tail (`model::vit`) runs for `Class` alone; its backward
//! leaves the class token's gradient in `s.d_cls` and does not touch `s.dx`.

use super::family::Pool;
use super::linear::{linear_backward, linear_forward, Flow, LinearShape, Saved};
use super::params::Linear;
use super::vit::{Grads, Vit, VitActs, VitBackwardScratch};
use crate::device::BufKind;
use crate::ops::embed::{self, RowCopy, RowMean};
use crate::ops::layernorm::{self, Params};
use crate::ops::matmul::Accumulate;
use crate::ops::{add, scale, Backend, Rows};
use anyhow::{anyhow, Result};

/// The distillation token's rows, their LayerNorm and the distillation
/// head's logits (`Pool::Distilled`).
pub struct DistActs<T> {
    pub x: T,
    pub ln: T,
    pub mean: T,
    pub rstd: T,
    pub logits: T,
}

/// The final LayerNorm on every token and the head's input
/// `[class token ; mean of the patch tokens]` (`Pool::ClassAndMean`).
pub struct EveryTokenActs<T> {
    pub ln: T,
    pub mean: T,
    pub rstd: T,
    /// `[batch, 2, width]`.
    pub pooled: T,
}

/// The activations of the poolings that need more than the class token's.
pub struct PoolActs<T> {
    pub dist: Option<DistActs<T>>,
    pub every: Option<EveryTokenActs<T>>,
}

/// Backward scratch of the poolings that need more than the class token's.
pub struct PoolScratch<T> {
    /// Distilled: the gradients of the distillation rows and their LN,
    /// `[batch, width]` each, and half the logits' gradient.
    pub dist: Option<(T, T, T)>,
    /// ClassAndMean: the gradients of the head's input `[batch, 2 width]`
    /// and of the LN's output on every token `[batch·tokens, width]`.
    pub every: Option<(T, T)>,
}

/// Element counts of the buffers `Pool` adds to a model's activations
/// (`[activations, statistics]`) for `batch` images of `tokens` tokens.
pub fn act_elems(
    pool: Pool,
    batch: usize,
    tokens: usize,
    width: usize,
    classes: usize,
) -> [usize; 2] {
    let (b, n) = (batch, batch * tokens);
    match pool {
        Pool::Class | Pool::Average => [0, 0],
        Pool::Distilled => [2 * b * width + b * classes, 2 * b],
        Pool::ClassAndMean => [n * width + 2 * b * width, 2 * n],
    }
}

/// Element counts of `PoolScratch` (all activations).
pub fn scratch_elems(
    pool: Pool,
    batch: usize,
    tokens: usize,
    width: usize,
    classes: usize,
) -> usize {
    let (b, n) = (batch, batch * tokens);
    match pool {
        Pool::Class | Pool::Average => 0,
        Pool::Distilled => 2 * b * width + b * classes,
        Pool::ClassAndMean => 2 * b * width + n * width,
    }
}

/// Allocate the pooling's activations for up to `batch` images.
pub fn alloc_acts<B: Backend>(be: &B, vit: &Vit<B>, batch: usize) -> Result<PoolActs<B::Buf>> {
    let c = &vit.cfg;
    let (d, n) = (c.width, batch * c.tokens());
    let a = |len: usize| be.alloc(len, BufKind::Activation);
    let stat = |len: usize| be.alloc(len, BufKind::Statistic);
    Ok(match c.family.pool {
        Pool::Class | Pool::Average => PoolActs {
            dist: None,
            every: None,
        },
        Pool::Distilled => PoolActs {
            dist: Some(DistActs {
                x: a(batch * d)?,
                ln: a(batch * d)?,
                mean: stat(batch)?,
                rstd: stat(batch)?,
                logits: a(batch * c.classes)?,
            }),
            every: None,
        },
        Pool::ClassAndMean => PoolActs {
            dist: None,
            every: Some(EveryTokenActs {
                ln: a(n * d)?,
                mean: stat(n)?,
                rstd: stat(n)?,
                pooled: a(2 * batch * d)?,
            }),
        },
    })
}

/// Allocate `PoolScratch` for up to `batch` images.
pub fn alloc_scratch<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    batch: usize,
) -> Result<PoolScratch<B::Buf>> {
    let c = &vit.cfg;
    let (d, n) = (c.width, batch * c.tokens());
    let a = |len: usize| be.alloc(len, BufKind::Activation);
    Ok(match c.family.pool {
        Pool::Class | Pool::Average => PoolScratch {
            dist: None,
            every: None,
        },
        Pool::Distilled => PoolScratch {
            dist: Some((a(batch * d)?, a(batch * d)?, a(batch * c.classes)?)),
            every: None,
        },
        Pool::ClassAndMean => PoolScratch {
            dist: None,
            every: Some((a(2 * batch * d)?, a(n * d)?)),
        },
    })
}

fn head_shape<B: Backend>(vit: &Vit<B>) -> LinearShape {
    LinearShape {
        inp: vit.cfg.family.pool.head_inputs(vit.cfg.width),
        out: vit.cfg.classes,
        rank: None,
    }
}

/// The class or distillation token's rows of `x` (`[batch, tokens, width]`)
/// into `[batch, width]`, or (`back`) the other way, added.
fn token_rows<B: Backend>(vit: &Vit<B>, batch: usize, row: usize, back: bool) -> RowCopy {
    let (t, d) = (vit.cfg.tokens(), vit.cfg.width);
    let (src_tokens, src_at, dst_tokens, dst_at) =
        if back { (1, 0, t, row) } else { (t, row, 1, 0) };
    RowCopy {
        batch,
        width: d,
        src_tokens,
        src_at,
        dst_tokens,
        dst_at,
        rows: 1,
        broadcast: false,
    }
}

/// The mean of the patch tokens of a `[batch, tokens, width]` stream into
/// slot `slot` of a `[batch, slots, width]` buffer.
fn patch_mean<B: Backend>(vit: &Vit<B>, batch: usize, slots: usize, slot: usize) -> RowMean {
    let c = &vit.cfg;
    RowMean {
        batch,
        width: c.width,
        src_tokens: c.tokens(),
        src_at: c.prefix(),
        count: c.n_patches(),
        dst_tokens: slots,
        dst_at: slot,
    }
}

/// The class token's head, shared by every pooling that reduces the
/// stream to one row per image in `acts.cls` (class, average, and the
/// class half of distilled): `acts.logits = head(LN(acts.cls))`.
pub(super) fn class_head_forward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    acts: &mut VitActs<B>,
    batch: usize,
) -> Result<()> {
    let (c, p) = (&vit.cfg, &vit.params);
    layernorm::forward(
        be,
        layernorm::Outputs {
            out: &mut acts.cls_ln,
            mean: &mut acts.cls_mean,
            rstd: &mut acts.cls_rstd,
        },
        &acts.cls,
        Params {
            gamma: &p.norm_w,
            beta: &p.norm_b,
        },
        Rows::new(batch, c.width),
        c.ln_eps,
    )?;
    linear_forward(
        be,
        &p.head,
        head_shape(vit),
        &mut acts.logits,
        None,
        &acts.cls_ln,
        batch,
    )
}

/// The backward of `class_head_forward` from `dy`: WRITES `d_cls` (the
/// gradient of `acts.cls`; `s.d_cls`) through `d_cls_ln` (`s.d_cls_ln`),
/// ADDS the head's and final LayerNorm's gradients.
pub(super) fn class_head_backward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    acts: &VitActs<B>,
    dy: &B::Buf,
    grads: &mut Grads<B>,
    (d_cls_ln, d_cls): (&mut B::Buf, &mut B::Buf),
    batch: usize,
) -> Result<()> {
    let p = &vit.params;
    head_backward(
        be,
        vit,
        (&p.head, &mut grads.head),
        &acts.cls_ln,
        dy,
        d_cls_ln,
        batch,
    )?;
    be.zero(d_cls, batch * vit.cfg.width)?;
    layernorm::backward(
        be,
        layernorm::Grads {
            dx: d_cls,
            dgamma: &mut grads.norm_w,
            dbeta: &mut grads.norm_b,
        },
        d_cls_ln,
        layernorm::Saved {
            x: &acts.cls,
            mean: &acts.cls_mean,
            rstd: &acts.cls_rstd,
        },
        &p.norm_w,
        Rows::new(batch, vit.cfg.width),
    )
}

/// The logits from `x` (the final residual stream, written by the blocks)
/// for every pooling but `Class` (which `Vit` runs itself, with its tail).
pub fn forward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    acts: &mut VitActs<B>,
    batch: usize,
) -> Result<()> {
    let (c, p) = (&vit.cfg, &vit.params);
    let d = c.width;
    let ln = |be: &B,
              out: &mut B::Buf,
              mean: &mut B::Buf,
              rstd: &mut B::Buf,
              x: &B::Buf,
              rows: usize| {
        layernorm::forward(
            be,
            layernorm::Outputs { out, mean, rstd },
            x,
            Params {
                gamma: &p.norm_w,
                beta: &p.norm_b,
            },
            Rows::new(rows, d),
            c.ln_eps,
        )
    };
    match c.family.pool {
        Pool::Class => Err(anyhow!("class-token pooling runs in Vit::forward")),
        Pool::Average => {
            embed::mean_rows(be, &mut acts.cls, &acts.x_out, patch_mean(vit, batch, 1, 0))?;
            class_head_forward(be, vit, acts, batch)
        }
        Pool::Distilled => {
            let head_dist = p
                .head_dist
                .as_ref()
                .ok_or_else(|| anyhow!("distilled pooling without head_dist"))?;
            embed::cls_gather(be, &mut acts.cls, &acts.x_out, batch, c.tokens(), d)?;
            class_head_forward(be, vit, acts, batch)?;
            let dist = acts
                .pool
                .dist
                .as_mut()
                .ok_or_else(|| anyhow!("distilled pooling without its buffers"))?;
            let row = c.family.dist_row();
            embed::copy_rows(
                be,
                &mut dist.x,
                &acts.x_out,
                token_rows(vit, batch, row, false),
                Accumulate::Overwrite,
            )?;
            ln(
                be,
                &mut dist.ln,
                &mut dist.mean,
                &mut dist.rstd,
                &dist.x,
                batch,
            )?;
            linear_forward(
                be,
                head_dist,
                head_shape(vit),
                &mut dist.logits,
                None,
                &dist.ln,
                batch,
            )?;
            let len = batch * c.classes;
            add::add_assign(be, &mut acts.logits, &dist.logits, len)?;
            scale::by(be, &mut acts.logits, 0.5, len)
        }
        Pool::ClassAndMean => {
            let e = acts
                .pool
                .every
                .as_mut()
                .ok_or_else(|| anyhow!("class-and-mean pooling without its buffers"))?;
            ln(
                be,
                &mut e.ln,
                &mut e.mean,
                &mut e.rstd,
                &acts.x_out,
                batch * c.tokens(),
            )?;
            let to_slot0 = RowCopy {
                dst_tokens: 2,
                ..token_rows(vit, batch, 0, false)
            };
            embed::copy_rows(be, &mut e.pooled, &e.ln, to_slot0, Accumulate::Overwrite)?;
            embed::mean_rows(be, &mut e.pooled, &e.ln, patch_mean(vit, batch, 2, 1))?;
            linear_forward(
                be,
                &p.head,
                head_shape(vit),
                &mut acts.logits,
                None,
                &e.pooled,
                batch,
            )
        }
    }
}

/// A head's backward (no input gradient mode but overwrite).
fn head_backward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    (head, grad): (&Linear<B::Buf>, &mut Linear<B::Buf>),
    x: &B::Buf,
    dy: &B::Buf,
    dx: &mut B::Buf,
    batch: usize,
) -> Result<()> {
    linear_backward(
        be,
        head,
        grad,
        head_shape(vit),
        Saved {
            rows: batch,
            x,
            h: None,
        },
        Flow {
            dy,
            dx: Some((dx, Accumulate::Overwrite)),
            dh: None,
        },
    )
}

/// The backward of `forward` from `d_logits`: WRITES `s.dx` (every token's
/// gradient of the final residual stream), ADDS the head's and final
/// LayerNorm's gradients.
pub fn backward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    acts: &VitActs<B>,
    d_logits: &B::Buf,
    grads: &mut Grads<B>,
    s: &mut VitBackwardScratch<B>,
    batch: usize,
) -> Result<()> {
    let (c, p) = (&vit.cfg, &vit.params);
    let d = c.width;
    let n = batch * c.tokens();
    be.zero(&mut s.dx, n * d)?;
    let norm_w = &p.norm_w;
    let ln_back = |be: &B,
                   dx: &mut B::Buf,
                   dgamma: &mut B::Buf,
                   dbeta: &mut B::Buf,
                   dout: &B::Buf,
                   saved: (&B::Buf, &B::Buf, &B::Buf),
                   rows: usize| {
        layernorm::backward(
            be,
            layernorm::Grads { dx, dgamma, dbeta },
            dout,
            layernorm::Saved {
                x: saved.0,
                mean: saved.1,
                rstd: saved.2,
            },
            norm_w,
            Rows::new(rows, d),
        )
    };
    match c.family.pool {
        Pool::Class => Err(anyhow!("class-token pooling runs in Vit::backward")),
        Pool::Average => {
            let class_rows = (&mut s.d_cls_ln, &mut s.d_cls);
            class_head_backward(be, vit, acts, d_logits, grads, class_rows, batch)?;
            embed::mean_rows_backward(be, &mut s.dx, &s.d_cls, patch_mean(vit, batch, 1, 0))
        }
        Pool::Distilled => {
            let dist = acts
                .pool
                .dist
                .as_ref()
                .ok_or_else(|| anyhow!("distilled pooling without its buffers"))?;
            let (d_dist, d_dist_ln, d_half) = s
                .pool
                .dist
                .as_mut()
                .ok_or_else(|| anyhow!("distilled pooling without its scratch"))?;
            let head_dist = p
                .head_dist
                .as_ref()
                .ok_or_else(|| anyhow!("distilled pooling without head_dist"))?;
            let len = batch * c.classes;
            be.copy(d_half, d_logits, len)?;
            scale::by(be, d_half, 0.5, len)?;
            let class_rows = (&mut s.d_cls_ln, &mut s.d_cls);
            class_head_backward(be, vit, acts, d_half, grads, class_rows, batch)?;
            let g_head_dist = grads
                .head_dist
                .as_mut()
                .ok_or_else(|| anyhow!("distilled pooling without head_dist's gradient"))?;
            head_backward(
                be,
                vit,
                (head_dist, g_head_dist),
                &dist.ln,
                d_half,
                d_dist_ln,
                batch,
            )?;
            be.zero(d_dist, batch * d)?;
            ln_back(
                be,
                d_dist,
                &mut grads.norm_w,
                &mut grads.norm_b,
                d_dist_ln,
                (&dist.x, &dist.mean, &dist.rstd),
                batch,
            )?;
            embed::cls_scatter_add(be, &mut s.dx, &s.d_cls, batch, c.tokens(), d)?;
            embed::copy_rows(
                be,
                &mut s.dx,
                d_dist,
                token_rows(vit, batch, c.family.dist_row(), true),
                Accumulate::Add,
            )
        }
        Pool::ClassAndMean => {
            let e = acts
                .pool
                .every
                .as_ref()
                .ok_or_else(|| anyhow!("class-and-mean pooling without its buffers"))?;
            let (d_pooled, d_ln) = s
                .pool
                .every
                .as_mut()
                .ok_or_else(|| anyhow!("class-and-mean pooling without its scratch"))?;
            head_backward(
                be,
                vit,
                (&p.head, &mut grads.head),
                &e.pooled,
                d_logits,
                d_pooled,
                batch,
            )?;
            be.zero(d_ln, n * d)?;
            let from_slot0 = RowCopy {
                src_tokens: 2,
                ..token_rows(vit, batch, 0, true)
            };
            embed::copy_rows(be, d_ln, d_pooled, from_slot0, Accumulate::Add)?;
            embed::mean_rows_backward(be, d_ln, d_pooled, patch_mean(vit, batch, 2, 1))?;
            ln_back(
                be,
                &mut s.dx,
                &mut grads.norm_w,
                &mut grads.norm_b,
                d_ln,
                (&acts.x_out, &e.mean, &e.rstd),
                n,
            )
        }
    }
}
