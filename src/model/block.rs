//! One pre-norm transformer block of a `Vit`, forward and backward side by
//! side (the math is in `vit.rs`'s header):
//!
//! ```text
//! forward                                  backward (reverse order)
//!   a      = LN1(x)            kv_forward    ln1_backward         dx (+)= LN1ᵀ(d_ln)
//!   k, v   = a Wkᵀ, a Wvᵀ      kv_forward    qkv_backward         d_ln = Σ dq/dk/dv Wᵀ
//!   q      = a Wqᵀ             attention_forward
//!   attn   = softmax(q kᵀ/√dh) v             attention_backward   dq, dk, dv
//!   m      = x + attn Woᵀ      tail_forward  attention_backward   d_attn = d_sub Wo
//!   x_next = m + MLP(LN2(m))   tail_forward  mlp_backward         dx (+)= LN2ᵀ(MLPᵀ(d_out))
//! ```
//!
//! With LayerScale (`family.layer_scale`) each sub-layer's output is
//! scaled per channel before its residual add, `m = x + γ₁ ⊙ attn Woᵀ` and
//! `x_next = m + γ₂ ⊙ MLP(LN2(m))`; the sub-layer outputs (the features)
//! are the scaled ones. The activation is the family's (`family.act`).
//!
//! The class-token tail (`class_token_forward` / `class_token_backward`)
//! is the last block when only the logits are needed: after K and V on
//! every token, the query (with `ModelPaths::class_token_query`), the
//! attention output and everything after it run on the class token's rows
//! alone (`vit.rs`, module doc).

use super::linear::{linear_backward, linear_forward, Flow, LinearShape, Saved};
use super::params::{self, BlockLinear};
use super::vit::{BlockActs, BlockOut, ClassTokenActs, Vit, VitBackwardScratch};
use crate::ops::add_layernorm::Terms;
use crate::ops::attention::{AttentionShape, Qkv};
use crate::ops::layernorm::Params;
use crate::ops::matmul::Accumulate;
use crate::ops::{add, add_layernorm, attention, embed, gelu, layernorm, scale, Backend, Rows};
use anyhow::{bail, Result};

/// Block `l` of `vit`.
pub(super) struct TransformerBlock<'a, B: Backend> {
    pub vit: &'a Vit<B>,
    pub l: usize,
}

impl<'a, B: Backend> TransformerBlock<'a, B> {
    fn params(&self) -> &'a params::Block<B::Buf> {
        &self.vit.params.blocks[self.l]
    }

    fn shape(&self, layer: BlockLinear) -> LinearShape {
        self.vit.linear_shape(self.l, layer)
    }

    /// LN1 and K, V on every token. On the fused path the previous block
    /// wrote this block's LN1 with its output (`tail_forward`).
    pub fn kv_forward(
        &self,
        be: &B,
        a: &mut BlockActs<B::Buf>,
        shape: AttentionShape,
    ) -> Result<()> {
        let (c, bp, n) = (&self.vit.cfg, self.params(), shape.batch * shape.tokens);
        if !(self.vit.paths.fused_add_layernorm && self.l > 0) {
            layernorm::forward(
                be,
                layernorm::Outputs {
                    out: &mut a.ln1,
                    mean: &mut a.ln1_mean,
                    rstd: &mut a.ln1_rstd,
                },
                &a.x_in,
                Params {
                    gamma: &bp.norm1_w,
                    beta: &bp.norm1_b,
                },
                Rows::new(n, c.width),
                c.ln_eps,
            )?;
        }
        for (layer, w, out) in [
            (BlockLinear::K, &bp.k, &mut a.k),
            (BlockLinear::V, &bp.v, &mut a.v),
        ] {
            linear_forward(
                be,
                w,
                self.shape(layer),
                out,
                a.h[layer].as_mut(),
                &a.ln1,
                n,
            )?;
        }
        Ok(())
    }

    /// Q and attention on every token.
    pub fn attention_forward(
        &self,
        be: &B,
        a: &mut BlockActs<B::Buf>,
        shape: AttentionShape,
    ) -> Result<()> {
        let n = shape.batch * shape.tokens;
        linear_forward(
            be,
            &self.params().q,
            self.shape(BlockLinear::Q),
            &mut a.q,
            a.h[BlockLinear::Q].as_mut(),
            &a.ln1,
            n,
        )?;
        attention::forward(
            be,
            &mut a.attn,
            &mut a.probs,
            Qkv {
                q: &a.q,
                k: &a.k,
                v: &a.v,
            },
            shape,
        )
    }

    /// The class-token tail after `kv_forward`: the class token's query and
    /// attention (or every token's, keeping the class token's row, without
    /// `class_token_query`), then the rest of the block on the class-token
    /// rows, written to `out` (`[batch, D]`).
    pub fn class_token_forward(
        &self,
        be: &B,
        a: &mut BlockActs<B::Buf>,
        ct: &mut ClassTokenActs<B::Buf>,
        out: &mut B::Buf,
        shape: AttentionShape,
    ) -> Result<()> {
        let (batch, t, d) = (shape.batch, shape.tokens, self.vit.cfg.width);
        if self.vit.paths.class_token_query {
            embed::cls_gather(be, &mut ct.ln1, &a.ln1, batch, t, d)?;
            linear_forward(
                be,
                &self.params().q,
                self.shape(BlockLinear::Q),
                &mut ct.q,
                a.h[BlockLinear::Q].as_mut(),
                &ct.ln1,
                batch,
            )?;
            attention::class_token_forward(
                be,
                &mut ct.attn,
                &mut ct.probs,
                Qkv {
                    q: &ct.q,
                    k: &a.k,
                    v: &a.v,
                },
                shape,
            )?;
        } else {
            self.attention_forward(be, a, shape)?;
            embed::cls_gather(be, &mut ct.attn, &a.attn, batch, t, d)?;
        }
        embed::cls_gather(be, &mut ct.x_in, &a.x_in, batch, t, d)?;
        self.tail_forward(be, a, Some((&ct.x_in, &ct.attn)), BlockOut::Buf(out), batch)
    }

    /// The rest of the block after attention, on `rows` rows, writing the
    /// block's output to `out`:
    /// `m = x_in + proj(attn)`, `x_next = m + fc2(GELU(fc1(LN2(m))))`.
    /// `x_in` and `attn` are the block's own (`a.x_in`, `a.attn`) unless
    /// `inputs` gives other rows of them.
    pub fn tail_forward(
        &self,
        be: &B,
        a: &mut BlockActs<B::Buf>,
        inputs: Option<(&B::Buf, &B::Buf)>,
        out: BlockOut<'_, B::Buf>,
        rows: usize,
    ) -> Result<()> {
        let (c, bp) = (&self.vit.cfg, self.params());
        let d = c.width;
        let fused = self.vit.paths.fused_add_layernorm;
        let (x_in, attn) = inputs.unwrap_or((&a.x_in, &a.attn));
        let proj_out = a.attn_proj.as_mut().unwrap_or(&mut a.attn_out);
        linear_forward(
            be,
            &bp.proj,
            self.shape(BlockLinear::Proj),
            proj_out,
            a.h[BlockLinear::Proj].as_mut(),
            attn,
            rows,
        )?;
        if let (Some(pre), Some(gamma)) = (&a.attn_proj, &bp.ls1) {
            scale::forward(be, &mut a.attn_out, pre, gamma, Rows::new(rows, d))?;
        }
        if fused {
            add_layernorm::forward(
                be,
                add_layernorm::Outputs {
                    sum: &mut a.x_mid,
                    out: &mut a.ln2,
                    mean: &mut a.ln2_mean,
                    rstd: &mut a.ln2_rstd,
                },
                Terms {
                    a: x_in,
                    b: &a.attn_out,
                },
                Params {
                    gamma: &bp.norm2_w,
                    beta: &bp.norm2_b,
                },
                Rows::new(rows, d),
                c.ln_eps,
            )?;
        } else {
            add::add(be, &mut a.x_mid, x_in, &a.attn_out, rows * d)?;
            layernorm::forward(
                be,
                layernorm::Outputs {
                    out: &mut a.ln2,
                    mean: &mut a.ln2_mean,
                    rstd: &mut a.ln2_rstd,
                },
                &a.x_mid,
                Params {
                    gamma: &bp.norm2_w,
                    beta: &bp.norm2_b,
                },
                Rows::new(rows, d),
                c.ln_eps,
            )?;
        }
        linear_forward(
            be,
            &bp.fc1,
            self.shape(BlockLinear::Fc1),
            &mut a.fc1_pre,
            a.h[BlockLinear::Fc1].as_mut(),
            &a.ln2,
            rows,
        )?;
        gelu::forward(be, &mut a.fc1_act, &a.fc1_pre, rows * c.mlp, c.family.act)?;
        let fc2_out = a.mlp_fc2.as_mut().unwrap_or(&mut a.mlp_out);
        linear_forward(
            be,
            &bp.fc2,
            self.shape(BlockLinear::Fc2),
            fc2_out,
            a.h[BlockLinear::Fc2].as_mut(),
            &a.fc1_act,
            rows,
        )?;
        if let (Some(pre), Some(gamma)) = (&a.mlp_fc2, &bp.ls2) {
            scale::forward(be, &mut a.mlp_out, pre, gamma, Rows::new(rows, d))?;
        }
        match out {
            BlockOut::Next(next) if fused => {
                let np = &self.vit.params.blocks[self.l + 1];
                add_layernorm::forward(
                    be,
                    add_layernorm::Outputs {
                        sum: &mut next.x_in,
                        out: &mut next.ln1,
                        mean: &mut next.ln1_mean,
                        rstd: &mut next.ln1_rstd,
                    },
                    Terms {
                        a: &a.x_mid,
                        b: &a.mlp_out,
                    },
                    Params {
                        gamma: &np.norm1_w,
                        beta: &np.norm1_b,
                    },
                    Rows::new(rows, d),
                    c.ln_eps,
                )
            }
            BlockOut::Next(next) => add::add(be, &mut next.x_in, &a.x_mid, &a.mlp_out, rows * d),
            BlockOut::Buf(x_next) => add::add(be, x_next, &a.x_mid, &a.mlp_out, rows * d),
        }
    }

    /// The MLP sub-layer's backward on `rows` rows, from `d_out` (the
    /// gradient of the block's output, to which LN2's input gradient is
    /// added), with the feature loss's gradient of the MLP output
    /// (`feature`) and `s.d_sub` already holding `d_out` when
    /// `d_sub_ready` (the fused path). Leaves in `s.d_sub` the gradient of
    /// the attention sub-layer's output.
    pub fn mlp_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        s: &mut VitBackwardScratch<B>,
        rows: usize,
        from: MlpGradient<'_, B::Buf>,
    ) -> Result<()> {
        let (c, bp) = (&self.vit.cfg, self.params());
        let d = c.width;
        let MlpGradient {
            d_out,
            d_sub_ready,
            feature,
        } = from;
        let d_out = match d_out {
            OutputGradient::EveryToken => &mut s.dx,
            OutputGradient::ClassToken => &mut s.d_cls,
        };
        if !d_sub_ready {
            be.copy(&mut s.d_sub, d_out, rows * d)?;
        }
        if let Some(f) = feature {
            add::add_assign(be, &mut s.d_sub, f, rows * d)?;
        }
        // s.d_attn is free until the attention sub-layer's backward.
        let dy = layer_scale_backward(
            be,
            LayerScale {
                gamma: bp.ls2.as_ref(),
                dgamma: g.ls2.as_mut(),
                x: a.mlp_fc2.as_ref(),
            },
            &s.d_sub,
            &mut s.d_attn,
            Rows::new(rows, d),
        )?;
        self.layer_backward(
            be,
            a,
            g,
            BlockLinear::Fc2,
            (&a.fc1_act, rows),
            Flow {
                dy,
                dx: Some((&mut s.d_hidden, Accumulate::Overwrite)),
                dh: Some(&mut s.dh),
            },
        )?;
        gelu::backward(
            be,
            &mut s.d_hidden2,
            &a.fc1_pre,
            &a.fc1_act,
            &s.d_hidden,
            rows * c.mlp,
            c.family.act,
        )?;
        self.layer_backward(
            be,
            a,
            g,
            BlockLinear::Fc1,
            (&a.ln2, rows),
            Flow {
                dy: &s.d_hidden2,
                dx: Some((&mut s.d_ln, Accumulate::Overwrite)),
                dh: Some(&mut s.dh),
            },
        )?;
        // m feeds both the residual and LN2: the LN2 gradient is added.
        let saved = layernorm::Saved {
            x: &a.x_mid,
            mean: &a.ln2_mean,
            rstd: &a.ln2_rstd,
        };
        if self.vit.paths.fused_add_layernorm {
            add_layernorm::backward(
                be,
                add_layernorm::Grads {
                    dx: d_out,
                    dbranch: &mut s.d_sub,
                    dgamma: &mut g.norm2_w,
                    dbeta: &mut g.norm2_b,
                },
                &s.d_ln,
                saved,
                &bp.norm2_w,
                Rows::new(rows, d),
            )
        } else {
            layernorm::backward(
                be,
                layernorm::Grads {
                    dx: d_out,
                    dgamma: &mut g.norm2_w,
                    dbeta: &mut g.norm2_b,
                },
                &s.d_ln,
                saved,
                &bp.norm2_w,
                Rows::new(rows, d),
            )?;
            be.copy(&mut s.d_sub, d_out, rows * d)
        }
    }

    /// The attention sub-layer's backward on every token, from `s.d_sub`
    /// (plus the feature loss's gradient of the attention output,
    /// `feature`): the projection into `s.d_attn`, then `qkv_backward`.
    pub fn attention_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        s: &mut VitBackwardScratch<B>,
        shape: AttentionShape,
        feature: Option<&B::Buf>,
    ) -> Result<()> {
        let n = shape.batch * shape.tokens;
        let d = self.vit.cfg.width;
        if let Some(f) = feature {
            add::add_assign(be, &mut s.d_sub, f, n * d)?;
        }
        // s.d_ln is free until Q, K and V's backward.
        let dy = layer_scale_backward(
            be,
            LayerScale {
                gamma: self.params().ls1.as_ref(),
                dgamma: g.ls1.as_mut(),
                x: a.attn_proj.as_ref(),
            },
            &s.d_sub,
            &mut s.d_ln,
            Rows::new(n, d),
        )?;
        self.layer_backward(
            be,
            a,
            g,
            BlockLinear::Proj,
            (&a.attn, n),
            Flow {
                dy,
                dx: Some((&mut s.d_attn, Accumulate::Overwrite)),
                dh: Some(&mut s.dh),
            },
        )?;
        self.qkv_backward(be, a, g, s, shape)
    }

    /// Attention on every token from `s.d_attn`, then Q, K and V: LN1's
    /// output gradient in `s.d_ln`.
    fn qkv_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        s: &mut VitBackwardScratch<B>,
        shape: AttentionShape,
    ) -> Result<()> {
        attention::backward(
            be,
            Qkv {
                q: &mut s.dq,
                k: &mut s.dk,
                v: &mut s.dv,
            },
            &s.d_attn,
            Qkv {
                q: &a.q,
                k: &a.k,
                v: &a.v,
            },
            &a.probs,
            shape,
        )?;
        let n = shape.batch * shape.tokens;
        self.ln1_layers_backward(
            be,
            a,
            g,
            s,
            n,
            [
                (BlockLinear::Q, Accumulate::Overwrite),
                (BlockLinear::K, Accumulate::Add),
                (BlockLinear::V, Accumulate::Add),
            ]
            .as_slice(),
        )
    }

    /// The class-token tail's attention sub-layer backward, from `s.d_sub`
    /// on the class-token rows (after `mlp_backward` on them): the
    /// projection on those rows; the block input's class-token rows take
    /// the residual's gradient (`s.d_cls`) into `s.dx`; then the attention
    /// and Q on the class-token rows (or every token, without
    /// `class_token_query`) and K and V on every token: LN1's output
    /// gradient in `s.d_ln`.
    pub fn class_token_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        ct: &ClassTokenActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        s: &mut VitBackwardScratch<B>,
        shape: AttentionShape,
    ) -> Result<()> {
        let (batch, t, d) = (shape.batch, shape.tokens, self.vit.cfg.width);
        let n = batch * t;
        // s.d_ln is free until K and V's backward.
        let dy = layer_scale_backward(
            be,
            LayerScale {
                gamma: self.params().ls1.as_ref(),
                dgamma: g.ls1.as_mut(),
                x: a.attn_proj.as_ref(),
            },
            &s.d_sub,
            &mut s.d_ln,
            Rows::new(batch, d),
        )?;
        self.layer_backward(
            be,
            a,
            g,
            BlockLinear::Proj,
            (&ct.attn, batch),
            Flow {
                dy,
                dx: Some((&mut s.d_cls_attn, Accumulate::Overwrite)),
                dh: Some(&mut s.dh),
            },
        )?;
        embed::cls_scatter_add(be, &mut s.dx, &s.d_cls, batch, t, d)?;
        if !self.vit.paths.class_token_query {
            // The other rows of the attention output get zero gradient.
            be.zero(&mut s.d_attn, n * d)?;
            embed::cls_scatter_add(be, &mut s.d_attn, &s.d_cls_attn, batch, t, d)?;
            return self.qkv_backward(be, a, g, s, shape);
        }
        attention::class_token_backward(
            be,
            Qkv {
                q: &mut s.d_cls_q,
                k: &mut s.dk,
                v: &mut s.dv,
            },
            &s.d_cls_attn,
            Qkv {
                q: &ct.q,
                k: &a.k,
                v: &a.v,
            },
            &ct.probs,
            shape,
        )?;
        self.ln1_layers_backward(
            be,
            a,
            g,
            s,
            n,
            [
                (BlockLinear::K, Accumulate::Overwrite),
                (BlockLinear::V, Accumulate::Add),
            ]
            .as_slice(),
        )?;
        self.layer_backward(
            be,
            a,
            g,
            BlockLinear::Q,
            (&ct.ln1, batch),
            Flow {
                dy: &s.d_cls_q,
                dx: Some((&mut s.d_cls_ln1, Accumulate::Overwrite)),
                dh: Some(&mut s.dh),
            },
        )?;
        embed::cls_scatter_add(be, &mut s.d_ln, &s.d_cls_ln1, batch, t, d)
    }

    /// `layer`'s backward from `flow`, with the input the forward gave it
    /// (`x` on `rows` rows) and its low-rank intermediate; its parameter
    /// gradients are added to `g`.
    fn layer_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        layer: BlockLinear,
        (x, rows): (&B::Buf, usize),
        flow: Flow<'_, B::Buf>,
    ) -> Result<()> {
        linear_backward(
            be,
            self.params().linear(layer),
            g.linear_mut(layer),
            self.shape(layer),
            Saved {
                rows,
                x,
                h: a.h[layer].as_ref(),
            },
            flow,
        )
    }

    /// The backward of projections of LN1's output on every token, in the
    /// order given, each from its own gradient (`s.dq`, `s.dk`, `s.dv`),
    /// their input gradients written or added into `s.d_ln` as each says.
    fn ln1_layers_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        s: &mut VitBackwardScratch<B>,
        rows: usize,
        layers: &[(BlockLinear, Accumulate)],
    ) -> Result<()> {
        for &(layer, into) in layers {
            let dy = match layer {
                BlockLinear::Q => &s.dq,
                BlockLinear::K => &s.dk,
                BlockLinear::V => &s.dv,
                other => anyhow::bail!("{other:?} does not read LN1's output"),
            };
            let flow = Flow {
                dy,
                dx: Some((&mut s.d_ln, into)),
                dh: Some(&mut s.dh),
            };
            self.layer_backward(be, a, g, layer, (&a.ln1, rows), flow)?;
        }
        Ok(())
    }

    /// LN1's backward on every token from `s.d_ln`, added into `s.dx` (the
    /// residual's gradient already there). On the fused path (not for the
    /// first block) it also leaves a copy of the result in `s.d_sub`, where
    /// the previous block's MLP backward starts: the return value says so.
    pub fn ln1_backward(
        &self,
        be: &B,
        a: &BlockActs<B::Buf>,
        g: &mut params::Block<B::Buf>,
        s: &mut VitBackwardScratch<B>,
        rows: usize,
    ) -> Result<bool> {
        let bp = self.params();
        let saved = layernorm::Saved {
            x: &a.x_in,
            mean: &a.ln1_mean,
            rstd: &a.ln1_rstd,
        };
        let shape = Rows::new(rows, self.vit.cfg.width);
        let d_sub_ready = self.vit.paths.fused_add_layernorm && self.l > 0;
        if d_sub_ready {
            add_layernorm::backward(
                be,
                add_layernorm::Grads {
                    dx: &mut s.dx,
                    dbranch: &mut s.d_sub,
                    dgamma: &mut g.norm1_w,
                    dbeta: &mut g.norm1_b,
                },
                &s.d_ln,
                saved,
                &bp.norm1_w,
                shape,
            )?;
        } else {
            layernorm::backward(
                be,
                layernorm::Grads {
                    dx: &mut s.dx,
                    dgamma: &mut g.norm1_w,
                    dbeta: &mut g.norm1_b,
                },
                &s.d_ln,
                saved,
                &bp.norm1_w,
                shape,
            )?;
        }
        Ok(d_sub_ready)
    }
}

/// Which scratch buffer holds the gradient of a block's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OutputGradient {
    /// `s.dx`, every token's rows.
    EveryToken,
    /// `s.d_cls`, the class-token rows (the class-token tail).
    ClassToken,
}

/// Where the MLP sub-layer's backward starts (`mlp_backward`).
pub(super) struct MlpGradient<'b, T> {
    /// The gradient of the block's output; LN2's input gradient is added
    /// to it.
    pub d_out: OutputGradient,
    /// `s.d_sub` already holds `d_out` (the next block's fused LN1 backward
    /// left it there).
    pub d_sub_ready: bool,
    /// The feature loss's gradient of the MLP output.
    pub feature: Option<&'b T>,
}

/// A sub-layer's LayerScale as its backward reads it: γ, γ's gradient and
/// the sub-layer's output before γ (all absent without LayerScale).
struct LayerScale<'a, T> {
    gamma: Option<&'a T>,
    dgamma: Option<&'a mut T>,
    x: Option<&'a T>,
}

/// The gradient of a sub-layer's output before LayerScale, from `dy`, its
/// gradient after: `γ ⊙ dy` written into `scratch` (and γ's gradient
/// added), or `dy` itself without LayerScale.
fn layer_scale_backward<'s, B: Backend>(
    be: &B,
    ls: LayerScale<'_, B::Buf>,
    dy: &'s B::Buf,
    scratch: &'s mut B::Buf,
    rows: Rows,
) -> Result<&'s B::Buf> {
    match (ls.gamma, ls.dgamma, ls.x) {
        (None, None, None) => Ok(dy),
        (Some(gamma), Some(dgamma), Some(x)) => {
            scale::backward(be, scratch, dgamma, dy, x, gamma, rows)?;
            Ok(scratch)
        }
        _ => bail!("LayerScale: its parameter, gradient and saved input disagree"),
    }
}
