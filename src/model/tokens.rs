//! From patch embeddings to the first block's input, forward and backward,
//! for every family's prefix tokens and position embedding (`model::family`):
//!
//! ```text
//! x[b, 0..prefix]      = [cls; dist; reg_1..reg_R]       (those the family has)
//! x[b, prefix + i]     = patch_out[b, i]
//! x[b, pos_from + j]  += pos[j]                           (every token, or the patches)
//! x_0                  = LN_pre(x)  with norm_pre (CLIP), else x
//!   backward: dpatch_out[b, i] = dx[b, prefix + i];  dtoken += Σ_b dx[b, its row];
//!             dpos[j] += Σ_b dx[b, pos_from + j];  LN_pre's backward first
//! ```
//! The plain layout (a class token, position embedding on every token) runs
//! the one fused op `embed::tokens_forward`; the others run one row copy per
//! part (`embed::copy_rows`).

use super::config::VitConfig;
use super::family::PosEmbed;
use super::params::VitParams;
use super::vit::Vit;
use crate::ops::embed::{self, RowCopy, Tokens};
use crate::ops::layernorm::{self, Params};
use crate::ops::matmul::Accumulate;
use crate::ops::{Backend, Rows};
use anyhow::{bail, Result};

/// The plain layout: one class token, the position embedding on every token.
fn plain_layout(c: &VitConfig) -> bool {
    let f = &c.family;
    f.class_token && !f.dist_token && f.registers == 0 && f.pos_embed == PosEmbed::AllTokens
}

/// The prefix tokens a family has: (parameter, first row, rows).
fn prefix_parts<'a, T>(c: &VitConfig, p: &'a VitParams<T>) -> Vec<(&'a T, usize, usize)> {
    let f = &c.family;
    let mut parts = vec![];
    if let Some(cls) = &p.cls {
        parts.push((cls, 0, 1));
    }
    if let Some(dist) = &p.dist {
        parts.push((dist, f.dist_row(), 1));
    }
    if let Some(reg) = &p.reg {
        parts.push((reg, f.register_row(), f.registers));
    }
    parts
}

fn broadcast(c: &VitConfig, batch: usize, at: usize, rows: usize) -> RowCopy {
    RowCopy {
        batch,
        width: c.width,
        src_tokens: rows,
        src_at: 0,
        dst_tokens: c.tokens(),
        dst_at: at,
        rows,
        broadcast: true,
    }
}

fn patch_rows(c: &VitConfig, batch: usize) -> RowCopy {
    RowCopy {
        batch,
        width: c.width,
        src_tokens: c.n_patches(),
        src_at: 0,
        dst_tokens: c.tokens(),
        dst_at: c.prefix(),
        rows: c.n_patches(),
        broadcast: false,
    }
}

/// The saved state of `norm_pre`: the tokens before it and its statistics.
pub struct PreNorm<'a, T> {
    pub x: &'a mut T,
    pub mean: &'a mut T,
    pub rstd: &'a mut T,
}

/// Writes the first block's input `x0` (`[batch, tokens, width]`) from the
/// patch embeddings; with `norm_pre`, `pre` keeps the tokens before it.
pub fn forward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    x0: &mut B::Buf,
    pre: Option<PreNorm<'_, B::Buf>>,
    patch_out: &B::Buf,
    batch: usize,
) -> Result<()> {
    let (c, p) = (&vit.cfg, &vit.params);
    if pre.is_some() != c.family.norm_pre {
        bail!("norm_pre and its buffers disagree");
    }
    let Some(PreNorm { x, mean, rstd }) = pre else {
        return assemble(be, c, p, x0, patch_out, batch);
    };
    assemble(be, c, p, x, patch_out, batch)?;
    let (w, b) = p
        .norm_pre
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("norm_pre: the model has no norm_pre parameters"))?;
    layernorm::forward(
        be,
        layernorm::Outputs {
            out: x0,
            mean,
            rstd,
        },
        x,
        Params { gamma: w, beta: b },
        Rows::new(batch * c.tokens(), c.width),
        c.ln_eps,
    )
}

/// The tokens before `norm_pre` (module doc).
fn assemble<B: Backend>(
    be: &B,
    c: &VitConfig,
    p: &VitParams<B::Buf>,
    x: &mut B::Buf,
    patch_out: &B::Buf,
    batch: usize,
) -> Result<()> {
    if plain_layout(c) {
        let cls = p.cls.as_ref().expect("the plain layout has a class token");
        return embed::tokens_forward(
            be,
            x,
            patch_out,
            cls,
            &p.pos,
            Tokens {
                batch,
                n_patches: c.n_patches(),
                width: c.width,
            },
        );
    }
    embed::copy_rows(
        be,
        x,
        patch_out,
        patch_rows(c, batch),
        Accumulate::Overwrite,
    )?;
    for (token, at, rows) in prefix_parts(c, p) {
        embed::copy_rows(
            be,
            x,
            token,
            broadcast(c, batch, at, rows),
            Accumulate::Overwrite,
        )?;
    }
    embed::copy_rows(
        be,
        x,
        &p.pos,
        broadcast(c, batch, c.pos_from(), c.pos_rows()),
        Accumulate::Add,
    )
}

/// The saved state `backward` reads with `norm_pre`: its input and
/// statistics, and scratch for the gradient of its input.
pub struct PreNormSaved<'a, T> {
    pub x: &'a T,
    pub mean: &'a T,
    pub rstd: &'a T,
    pub dx: &'a mut T,
}

/// Backward from `dx0` (the gradient of the first block's input): WRITES
/// `dpatch_out`, ADDS to the prefix tokens', position embedding's and
/// `norm_pre`'s gradients in `g`.
pub fn backward<B: Backend>(
    be: &B,
    vit: &Vit<B>,
    g: &mut VitParams<B::Buf>,
    dx0: &B::Buf,
    pre: Option<PreNormSaved<'_, B::Buf>>,
    dpatch_out: &mut B::Buf,
    batch: usize,
) -> Result<()> {
    let (c, p) = (&vit.cfg, &vit.params);
    let n = batch * c.tokens();
    let dx: &B::Buf = match pre {
        Some(PreNormSaved { x, mean, rstd, dx }) => {
            let (w, _) = p
                .norm_pre
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("norm_pre: the model has no norm_pre parameters"))?;
            let (dw, db) = g
                .norm_pre
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("norm_pre: no gradients for norm_pre"))?;
            be.zero(dx, n * c.width)?;
            layernorm::backward(
                be,
                layernorm::Grads {
                    dx,
                    dgamma: dw,
                    dbeta: db,
                },
                dx0,
                layernorm::Saved { x, mean, rstd },
                w,
                Rows::new(n, c.width),
            )?;
            dx
        }
        None => dx0,
    };
    if plain_layout(c) {
        let dcls = g.cls.as_mut().expect("the plain layout has a class token");
        return embed::tokens_backward(
            be,
            dpatch_out,
            dcls,
            &mut g.pos,
            dx,
            Tokens {
                batch,
                n_patches: c.n_patches(),
                width: c.width,
            },
        );
    }
    // dpatch_out[b, i] = dx[b, prefix + i]: the patch copy read backwards.
    let back = patch_rows(c, batch);
    embed::copy_rows(
        be,
        dpatch_out,
        dx,
        RowCopy {
            src_tokens: back.dst_tokens,
            src_at: back.dst_at,
            dst_tokens: back.src_tokens,
            dst_at: 0,
            ..back
        },
        Accumulate::Overwrite,
    )?;
    let f = &c.family;
    let mut parts: Vec<(&mut B::Buf, usize, usize)> = vec![];
    if let Some(t) = g.cls.as_mut() {
        parts.push((t, 0, 1));
    }
    if let Some(t) = g.dist.as_mut() {
        parts.push((t, f.dist_row(), 1));
    }
    if let Some(t) = g.reg.as_mut() {
        parts.push((t, f.register_row(), f.registers));
    }
    parts.push((&mut g.pos, c.pos_from(), c.pos_rows()));
    for (grad, at, rows) in parts {
        embed::sum_rows_over_batch(be, grad, dx, broadcast(c, batch, at, rows))?;
    }
    Ok(())
}
