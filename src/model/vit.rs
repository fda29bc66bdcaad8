//! The Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16
//! Words", 2021), forward and hand-written backward, on any `Backend`
//! (a device with every op of `crate::ops`).
//!
//! ```text
//! patches  = gather(image)                       [B*P, C*p*p]
//! x_0      = [cls; patches Wpᵀ + bp] + pos       [B, T, D]     T = P + 1
//! for each block l (pre-norm):
//!   a      = LN1(x_l)
//!   q,k,v  = a Wqᵀ + bq, a Wkᵀ + bk, a Wvᵀ + bv  (dense or low-rank each)
//!   attn   = softmax(q kᵀ / √dh) v  per head
//!   f_attn = attn Woᵀ + bo                        (feature: attention output)
//!   m      = x_l + f_attn
//!   f_mlp  = GELU(LN2(m) W1ᵀ + b1) W2ᵀ + b2       (feature: MLP output)
//!   x_l+1  = m + f_mlp
//! logits   = LN(x_L[:, 0]) Whᵀ + bh               [B, classes]
//! ```
//! `forward_logits` (inference) computes the same logits with less work:
//! only the class token reaches the head, so the last block computes the
//! class token's query alone and its attention over every token's k and v
//! (`attention::class_token_forward`; with `paths.class_token_query`:
//! `--class-token-tail`, on by default for the CPU; otherwise every token's,
//! keeping the class token's row), and its projection,
//! residuals, LN2 and MLP run on the class-token rows only (one row in T;
//! ViT-B/32: ~7% of the forward's FLOPs).
//!
//! Training takes the same path when the loss reads only the logits (cross
//! entropy, KD) and the model's `paths.class_token_tail` is on (the CPU's
//! default; `options::ComputeOptions`): the rows of the other tokens after
//! the last block's attention get exactly zero gradient, so `backward`
//! after `forward_logits` runs that block's MLP, LN2, projection,
//! attention and Q backward on the class-token rows
//! (`attention::class_token_backward`, with `class_token_query`), which
//! still give every token's k and v a gradient; K, V and LN1 then run on
//! every token as after `forward`, the class-token rows of Q's input
//! gradient and of the residual stream scattered in. (Without
//! `class_token_query` the attention's gradient is scattered into the
//! zeroed rows of the other tokens and the attention and Q run on every
//! token.) The gradients are the full pass's up to
//! rounding (the weight gradients sum 64 rows where the full pass adds
//! 4,096 exact zeros to them; `tests/model_gradients.rs`); vit-cifar:
//! 13.9% of the products' FLOPs, and 1/6 of attention's. The feature loss
//! reads every token of the last block's sub-layer outputs and runs
//! `forward`.
//!
//! With `paths.fused_add_layernorm` (`--fused-add-layernorm on`, CUDA only) each residual add that a
//! LayerNorm reads runs with it as one op (`m` and LN2; `x_l+1` and the
//! next block's LN1), forward and backward; the numbers are the same.
//!
//! The backward pass runs the same steps in reverse; every gradient buffer
//! of a parameter is accumulated (`+=`), so `Grads` is zeroed once per step.
//! Activations are allocated once for a maximum batch (`VitActs::new`) and
//! reused every step; a smaller batch uses their leading part.

use super::config::VitConfig;
use super::linear::{linear_backward, linear_forward, Flow, LinearShape, Saved};
use super::params::{param_specs, validate_ranks, BlockLinear, PerLinear, Ranks, VitParams};
use crate::device::{BufKind, Device};
use crate::ops::add_layernorm::Terms;
use crate::ops::attention::{AttentionShape, Qkv};
use crate::ops::layernorm::Params;
use crate::ops::matmul::Accumulate;
use crate::ops::{add, add_layernorm, attention, embed, gelu, layernorm, matmul, Backend, Rows};
use crate::options::ModelPaths;
use anyhow::{bail, Result};

/// What a forward pass must produce.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outputs {
    /// Every activation (training; features for the feature loss).
    Everything,
    /// The logits alone (inference).
    LogitsOnly,
}

/// A ViT's shape, ranks and parameters on one device.
pub struct Vit<B: Backend> {
    pub cfg: VitConfig,
    pub ranks: Ranks,
    pub params: VitParams<B::Buf>,
    /// The paths this model takes (class-token tail, batch split, fused
    /// adds): fixed when it is made, from the options resolved for its
    /// device (`options::ComputeOptions::resolve`).
    pub paths: ModelPaths,
}

/// Where a block writes its output.
enum BlockOut<'a, T> {
    /// A buffer: the last block's `x_out`, or its class-token rows.
    Buf(&'a mut T),
    /// The next block (its index): its input, and on the fused path its LN1.
    Next(&'a mut BlockActs<T>, usize),
}

/// Gradients have the parameters' structure.
pub type Grads<B> = VitParams<<B as Device>::Buf>;

/// The gradient of the loss with respect to the model's outputs, where
/// `Vit::backward` starts: the logits' (`[batch, classes]`) and, for the
/// feature loss, every block's extra gradient with respect to its
/// attention output and its MLP output (`None` without the feature loss).
pub struct OutputGrads<'a, T> {
    pub logits: &'a T,
    pub features: Option<&'a [(T, T)]>,
}

/// Activations of one block, kept for the backward pass.
pub struct BlockActs<T> {
    /// Block input (the residual stream), `[N, D]`.
    pub x_in: T,
    pub ln1: T,
    pub ln1_mean: T,
    pub ln1_rstd: T,
    pub q: T,
    pub k: T,
    pub v: T,
    pub probs: T,
    pub attn: T,
    /// Attention sub-layer output before the residual add (a feature).
    pub attn_out: T,
    /// `x_in + attn_out`.
    pub x_mid: T,
    pub ln2: T,
    pub ln2_mean: T,
    pub ln2_rstd: T,
    pub fc1_pre: T,
    pub fc1_act: T,
    /// MLP sub-layer output before the residual add (a feature).
    pub mlp_out: T,
    /// Low-rank intermediates `h = x Vᵀ` of each layer (`None` for dense layers).
    pub h: PerLinear<Option<T>>,
}

/// Every activation of a forward pass for up to `max_batch` images.
pub struct VitActs<B: Backend> {
    pub max_batch: usize,
    pub images: B::Buf,
    pub patches: B::Buf,
    pub patch_out: B::Buf,
    pub blocks: Vec<BlockActs<B::Buf>>,
    /// Final residual stream `x_L`, `[N, D]` (not written by `forward_logits`).
    pub x_out: B::Buf,
    /// Class-token rows of the last block's input, LN1, query and attention
    /// output, `[batch, D]`, and its attention probabilities `[batch,
    /// heads, T]` (`forward_logits` only).
    pub cls_x_in: B::Buf,
    pub cls_ln1: B::Buf,
    pub cls_q: B::Buf,
    pub cls_probs: B::Buf,
    pub cls_attn: B::Buf,
    pub cls: B::Buf,
    pub cls_ln: B::Buf,
    pub cls_mean: B::Buf,
    pub cls_rstd: B::Buf,
    pub logits: B::Buf,
    /// The last forward pass's outputs and batch, which `backward` follows.
    forwarded: Option<(Outputs, usize)>,
}

/// Scratch buffers of the backward pass.
pub struct VitBackwardScratch<B: Backend> {
    pub dx: B::Buf,
    pub d_sub: B::Buf,
    pub d_ln: B::Buf,
    pub d_attn: B::Buf,
    pub dq: B::Buf,
    pub dk: B::Buf,
    pub dv: B::Buf,
    pub d_hidden: B::Buf,
    pub d_hidden2: B::Buf,
    pub dh: B::Buf,
    pub d_cls: B::Buf,
    pub d_cls_ln: B::Buf,
    /// Gradient of the last block's class-token query (class-token tail).
    pub d_cls_q: B::Buf,
    pub d_patch_out: B::Buf,
}

impl<B: Backend> Vit<B> {
    /// Upload host parameters (in `param_specs` order) to the device; the
    /// model takes `paths` (a command's options resolved for its device,
    /// `ComputeRecord::paths`, or `ModelPaths::default_of(be)`).
    pub fn from_host(
        be: &B,
        cfg: &VitConfig,
        ranks: &Ranks,
        host: &VitParams<Vec<f32>>,
        paths: ModelPaths,
    ) -> Result<Self> {
        cfg.validate()?;
        validate_ranks(cfg, ranks)?;
        let params = host.map(cfg, ranks, |spec, t| {
            if t.len() != spec.numel() {
                bail!(
                    "tensor {} has {} values, its shape {:?} needs {}",
                    spec.name,
                    t.len(),
                    spec.shape,
                    spec.numel()
                );
            }
            be.upload(t, BufKind::Param)
        })?;
        Ok(Vit {
            cfg: cfg.clone(),
            ranks: ranks.clone(),
            params,
            paths,
        })
    }

    /// Download the parameters to the host.
    pub fn to_host(&self, be: &B) -> Result<VitParams<Vec<f32>>> {
        self.params
            .map(&self.cfg, &self.ranks, |_, t| be.download(t))
    }

    /// Zero-filled gradients with the parameters' structure.
    pub fn zeros_like(&self, be: &B) -> Result<Grads<B>> {
        VitParams::build(&self.cfg, &self.ranks, |s| {
            be.alloc(s.numel(), BufKind::Param)
        })
    }

    /// Set every gradient to zero.
    pub fn zero_grads(&self, be: &B, grads: &mut Grads<B>) -> Result<()> {
        for (spec, g) in param_specs(&self.cfg, &self.ranks)
            .iter()
            .zip(grads.tensors_mut())
        {
            be.zero(g, spec.numel())?;
        }
        Ok(())
    }

    fn linear_shape(&self, block: usize, l: BlockLinear) -> LinearShape {
        let (out, inp) = l.shape(&self.cfg);
        LinearShape {
            inp,
            out,
            rank: self.ranks[block][l],
        }
    }

    fn head_shape(&self) -> LinearShape {
        LinearShape {
            inp: self.cfg.width,
            out: self.cfg.classes,
            rank: None,
        }
    }

    fn patch_shape(&self) -> LinearShape {
        LinearShape {
            inp: self.cfg.patch_dim(),
            out: self.cfg.width,
            rank: None,
        }
    }

    /// Allocate activations for up to `max_batch` images.
    pub fn new_acts(&self, be: &B, max_batch: usize) -> Result<VitActs<B>> {
        let c = &self.cfg;
        let (n, d, t) = (max_batch * c.tokens(), c.width, c.tokens());
        let a = |len: usize| be.alloc(len, BufKind::Activation);
        let stat = |len: usize| be.alloc(len, BufKind::Statistic);
        let mut blocks = Vec::with_capacity(c.depth);
        for br in &self.ranks {
            let mut h: PerLinear<Option<B::Buf>> = Default::default();
            for (layer, r) in br.iter() {
                if let Some(r) = r {
                    h[layer] = Some(a(n * r)?);
                }
            }
            blocks.push(BlockActs {
                x_in: a(n * d)?,
                ln1: a(n * d)?,
                ln1_mean: stat(n)?,
                ln1_rstd: stat(n)?,
                q: a(n * d)?,
                k: a(n * d)?,
                v: a(n * d)?,
                probs: a(max_batch * c.heads * t * t)?,
                attn: a(n * d)?,
                attn_out: a(n * d)?,
                x_mid: a(n * d)?,
                ln2: a(n * d)?,
                ln2_mean: stat(n)?,
                ln2_rstd: stat(n)?,
                fc1_pre: a(n * c.mlp)?,
                fc1_act: a(n * c.mlp)?,
                mlp_out: a(n * d)?,
                h,
            });
        }
        let img = c.channels * c.image_size * c.image_size;
        Ok(VitActs {
            max_batch,
            images: a(max_batch * img)?,
            patches: a(max_batch * c.n_patches() * c.patch_dim())?,
            patch_out: a(max_batch * c.n_patches() * d)?,
            blocks,
            x_out: a(n * d)?,
            cls_x_in: a(max_batch * d)?,
            cls_ln1: a(max_batch * d)?,
            cls_q: a(max_batch * d)?,
            cls_probs: a(max_batch * c.heads * t)?,
            cls_attn: a(max_batch * d)?,
            cls: a(max_batch * d)?,
            cls_ln: a(max_batch * d)?,
            cls_mean: stat(max_batch)?,
            cls_rstd: stat(max_batch)?,
            logits: a(max_batch * c.classes)?,
            forwarded: None,
        })
    }

    /// Allocate backward scratch for up to `max_batch` images.
    pub fn new_scratch(&self, be: &B, max_batch: usize) -> Result<VitBackwardScratch<B>> {
        let c = &self.cfg;
        let (n, d) = (max_batch * c.tokens(), c.width);
        let max_rank = self
            .ranks
            .iter()
            .flat_map(|b| b.values().flatten())
            .copied()
            .max()
            .unwrap_or(1);
        let a = |len: usize| be.alloc(len, BufKind::Activation);
        Ok(VitBackwardScratch {
            dx: a(n * d)?,
            d_sub: a(n * d)?,
            d_ln: a(n * d)?,
            d_attn: a(n * d)?,
            dq: a(n * d)?,
            dk: a(n * d)?,
            dv: a(n * d)?,
            d_hidden: a(n * c.mlp)?,
            d_hidden2: a(n * c.mlp)?,
            dh: a(n * max_rank)?,
            d_cls: a(max_batch * d)?,
            d_cls_ln: a(max_batch * d)?,
            d_cls_q: a(max_batch * d)?,
            d_patch_out: a(max_batch * c.n_patches() * d)?,
        })
    }

    /// Forward pass over `batch` images already in `acts.images`
    /// (`[batch, channels, size, size]`, normalized). Writes every activation
    /// and `acts.logits`.
    pub fn forward(&self, be: &B, acts: &mut VitActs<B>, batch: usize) -> Result<()> {
        self.forward_to(be, acts, batch, Outputs::Everything)
    }

    /// `acts.logits` only, for inference: the same logits as `forward`, but
    /// the last block's work after attention is done on the class-token rows
    /// alone, so that block's later activations (`attn_out` .. `mlp_out`)
    /// hold `batch` rows and `x_out` is not written. `backward` may follow
    /// (without feature gradients; module doc).
    pub fn forward_logits(&self, be: &B, acts: &mut VitActs<B>, batch: usize) -> Result<()> {
        self.forward_to(be, acts, batch, Outputs::LogitsOnly)
    }

    /// The forward a training loss needs: `forward_logits` when the loss
    /// reads only the logits and `class_token_tail` is on (module doc),
    /// else `forward` (every token; the feature loss reads them all).
    pub fn forward_for_loss(
        &self,
        be: &B,
        acts: &mut VitActs<B>,
        batch: usize,
        needs_features: bool,
    ) -> Result<()> {
        let outputs = if self.paths.class_token_tail && !needs_features {
            Outputs::LogitsOnly
        } else {
            Outputs::Everything
        };
        self.forward_to(be, acts, batch, outputs)
    }

    fn forward_to(
        &self,
        be: &B,
        acts: &mut VitActs<B>,
        batch: usize,
        outputs: Outputs,
    ) -> Result<()> {
        if batch == 0 || batch > acts.max_batch {
            bail!(
                "batch {batch} outside 1..={} (the activations' capacity)",
                acts.max_batch
            );
        }
        let c = &self.cfg;
        let p = &self.params;
        let (t, d) = (c.tokens(), c.width);
        let n = batch * t;
        let np = batch * c.n_patches();
        let shape = AttentionShape {
            batch,
            tokens: t,
            heads: c.heads,
            head_dim: c.head_dim(),
        };
        acts.forwarded = None;

        embed::patch_gather(
            be,
            &mut acts.patches,
            &acts.images,
            embed::Images {
                batch,
                channels: c.channels,
                size: c.image_size,
                patch: c.patch,
            },
        )?;
        matmul::linear_forward(
            be,
            &mut acts.patch_out,
            &acts.patches,
            &p.patch_w,
            &p.patch_b,
            self.patch_shape().dense(np),
        )?;
        embed::tokens_forward(
            be,
            &mut acts.blocks[0].x_in,
            &acts.patch_out,
            &p.cls,
            &p.pos,
            embed::Tokens {
                batch,
                n_patches: c.n_patches(),
                width: d,
            },
        )?;

        for l in 0..c.depth {
            let (done, rest) = acts.blocks.split_at_mut(l + 1);
            let a = &mut done[l];
            let bp = &p.blocks[l];
            // On the fused path the previous block wrote this LN1 with its output.
            if !(self.paths.fused_add_layernorm && l > 0) {
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
                    Rows::new(n, d),
                    c.ln_eps,
                )?;
            }
            linear_forward(
                be,
                &bp.k,
                self.linear_shape(l, BlockLinear::K),
                &mut a.k,
                a.h[BlockLinear::K].as_mut(),
                &a.ln1,
                n,
            )?;
            linear_forward(
                be,
                &bp.v,
                self.linear_shape(l, BlockLinear::V),
                &mut a.v,
                a.h[BlockLinear::V].as_mut(),
                &a.ln1,
                n,
            )?;
            let class_rows = rest.is_empty() && outputs == Outputs::LogitsOnly;
            if class_rows && self.paths.class_token_query {
                // Only the class token's row of this block reaches the logits: its query alone.
                embed::cls_gather(be, &mut acts.cls_ln1, &a.ln1, batch, t, d)?;
                linear_forward(
                    be,
                    &bp.q,
                    self.linear_shape(l, BlockLinear::Q),
                    &mut acts.cls_q,
                    a.h[BlockLinear::Q].as_mut(),
                    &acts.cls_ln1,
                    batch,
                )?;
                attention::class_token_forward(
                    be,
                    &mut acts.cls_attn,
                    &mut acts.cls_probs,
                    Qkv {
                        q: &acts.cls_q,
                        k: &a.k,
                        v: &a.v,
                    },
                    shape,
                )?;
            } else {
                linear_forward(
                    be,
                    &bp.q,
                    self.linear_shape(l, BlockLinear::Q),
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
                )?;
                if class_rows {
                    embed::cls_gather(be, &mut acts.cls_attn, &a.attn, batch, t, d)?;
                }
            }
            match (rest.first_mut(), outputs) {
                (Some(next), _) => {
                    self.block_tail(be, l, a, None, BlockOut::Next(next, l + 1), n)?
                }
                (None, Outputs::Everything) => {
                    self.block_tail(be, l, a, None, BlockOut::Buf(&mut acts.x_out), n)?
                }
                (None, Outputs::LogitsOnly) => {
                    embed::cls_gather(be, &mut acts.cls_x_in, &a.x_in, batch, t, d)?;
                    self.block_tail(
                        be,
                        l,
                        a,
                        Some((&acts.cls_x_in, &acts.cls_attn)),
                        BlockOut::Buf(&mut acts.cls),
                        batch,
                    )?;
                }
            }
        }

        if outputs == Outputs::Everything {
            embed::cls_gather(be, &mut acts.cls, &acts.x_out, batch, t, d)?;
        }
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
            Rows::new(batch, d),
            c.ln_eps,
        )?;
        linear_forward(
            be,
            &p.head,
            self.head_shape(),
            &mut acts.logits,
            None,
            &acts.cls_ln,
            batch,
        )?;
        acts.forwarded = Some((outputs, batch));
        Ok(())
    }

    /// The rest of block `l` after attention, on `rows` rows, writing the
    /// block's output to `out`:
    /// `m = x_in + proj(attn)`, `x_next = m + fc2(GELU(fc1(LN2(m))))`.
    /// `x_in` and `attn` are the block's own (`a.x_in`, `a.attn`) unless
    /// `inputs` gives other rows of them.
    fn block_tail(
        &self,
        be: &B,
        l: usize,
        a: &mut BlockActs<B::Buf>,
        inputs: Option<(&B::Buf, &B::Buf)>,
        out: BlockOut<'_, B::Buf>,
        rows: usize,
    ) -> Result<()> {
        let (c, bp) = (&self.cfg, &self.params.blocks[l]);
        let d = c.width;
        let (x_in, attn) = inputs.unwrap_or((&a.x_in, &a.attn));
        linear_forward(
            be,
            &bp.proj,
            self.linear_shape(l, BlockLinear::Proj),
            &mut a.attn_out,
            a.h[BlockLinear::Proj].as_mut(),
            attn,
            rows,
        )?;
        if self.paths.fused_add_layernorm {
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
            self.linear_shape(l, BlockLinear::Fc1),
            &mut a.fc1_pre,
            a.h[BlockLinear::Fc1].as_mut(),
            &a.ln2,
            rows,
        )?;
        gelu::forward(be, &mut a.fc1_act, &a.fc1_pre, rows * c.mlp)?;
        linear_forward(
            be,
            &bp.fc2,
            self.linear_shape(l, BlockLinear::Fc2),
            &mut a.mlp_out,
            a.h[BlockLinear::Fc2].as_mut(),
            &a.fc1_act,
            rows,
        )?;
        match out {
            BlockOut::Next(next, nl) if self.paths.fused_add_layernorm => {
                let np = &self.params.blocks[nl];
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
            BlockOut::Next(next, _) => add::add(be, &mut next.x_in, &a.x_mid, &a.mlp_out, rows * d),
            BlockOut::Buf(x_next) => add::add(be, x_next, &a.x_mid, &a.mlp_out, rows * d),
        }
    }

    /// Backward pass from `d.logits` (`[batch, classes]`), after `forward`
    /// or `forward_logits` of the same batch on the same `acts`.
    /// `d.features`, when given, holds for every block the extra gradient
    /// of the loss with respect to its attention output and its MLP output
    /// (the feature loss; needs `forward`). Adds every parameter gradient
    /// to `grads`.
    pub fn backward(
        &self,
        be: &B,
        acts: &VitActs<B>,
        d: OutputGrads<'_, B::Buf>,
        grads: &mut Grads<B>,
        s: &mut VitBackwardScratch<B>,
        batch: usize,
    ) -> Result<()> {
        let OutputGrads {
            logits: d_logits,
            features: feature_grads,
        } = d;
        let c = &self.cfg;
        let p = &self.params;
        let (t, d) = (c.tokens(), c.width);
        let n = batch * t;
        let shape = AttentionShape {
            batch,
            tokens: t,
            heads: c.heads,
            head_dim: c.head_dim(),
        };
        let tail = match acts.forwarded {
            None => bail!("backward needs a forward pass on these activations first"),
            Some((_, b)) if b != batch => {
                bail!("backward of a batch of {batch} after a forward of {b}")
            }
            Some((outputs, _)) => outputs == Outputs::LogitsOnly,
        };
        if let Some(f) = feature_grads {
            if f.len() != c.depth {
                bail!(
                    "feature gradients for {} blocks, the model has {}",
                    f.len(),
                    c.depth
                );
            }
            if tail {
                bail!("the feature loss reads every token of the last block: backward after `forward`, not `forward_logits`");
            }
        }

        // Head and final LayerNorm on the class token.
        linear_backward(
            be,
            &p.head,
            &mut grads.head,
            self.head_shape(),
            Saved {
                rows: batch,
                x: &acts.cls_ln,
                h: None,
            },
            Flow {
                dy: d_logits,
                dx: Some((&mut s.d_cls_ln, Accumulate::Overwrite)),
                dh: None,
            },
        )?;
        be.zero(&mut s.d_cls, batch * d)?;
        layernorm::backward(
            be,
            layernorm::Grads {
                dx: &mut s.d_cls,
                dgamma: &mut grads.norm_w,
                dbeta: &mut grads.norm_b,
            },
            &s.d_cls_ln,
            layernorm::Saved {
                x: &acts.cls,
                mean: &acts.cls_mean,
                rstd: &acts.cls_rstd,
            },
            &p.norm_w,
            Rows::new(batch, d),
        )?;
        be.zero(&mut s.dx, n * d)?;
        if !tail {
            embed::cls_scatter_add(be, &mut s.dx, &s.d_cls, batch, t, d)?;
        }

        // Blocks in reverse; s.dx holds the gradient of the block's output
        // (on the class-token tail, the last block's is s.d_cls, its
        // class-token rows). On the fused path a LayerNorm's backward also
        // leaves a copy of its dx in s.d_sub (`d_sub_ready`), the copy each
        // sub-layer starts from.
        let fused = self.paths.fused_add_layernorm;
        let mut d_sub_ready = false;
        for l in (0..c.depth).rev() {
            let a = &acts.blocks[l];
            let bp = &p.blocks[l];
            let g = &mut grads.blocks[l];
            let class_rows = tail && l + 1 == c.depth;
            let rows = if class_rows { batch } else { n };
            let d_out = if class_rows { &mut s.d_cls } else { &mut s.dx };

            // MLP sub-layer: f_mlp = fc2(gelu(fc1(LN2(m)))).
            if !d_sub_ready {
                be.copy(&mut s.d_sub, d_out, rows * d)?;
            }
            if let Some(f) = feature_grads {
                add::add_assign(be, &mut s.d_sub, &f[l].1, n * d)?;
            }
            linear_backward(
                be,
                &bp.fc2,
                &mut g.fc2,
                self.linear_shape(l, BlockLinear::Fc2),
                Saved {
                    rows,
                    x: &a.fc1_act,
                    h: a.h[BlockLinear::Fc2].as_ref(),
                },
                Flow {
                    dy: &s.d_sub,
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
            )?;
            linear_backward(
                be,
                &bp.fc1,
                &mut g.fc1,
                self.linear_shape(l, BlockLinear::Fc1),
                Saved {
                    rows,
                    x: &a.ln2,
                    h: a.h[BlockLinear::Fc1].as_ref(),
                },
                Flow {
                    dy: &s.d_hidden2,
                    dx: Some((&mut s.d_ln, Accumulate::Overwrite)),
                    dh: Some(&mut s.dh),
                },
            )?;
            // m feeds both the residual and LN2: the LN2 gradient is added.
            if fused {
                add_layernorm::backward(
                    be,
                    add_layernorm::Grads {
                        dx: d_out,
                        dbranch: &mut s.d_sub,
                        dgamma: &mut g.norm2_w,
                        dbeta: &mut g.norm2_b,
                    },
                    &s.d_ln,
                    layernorm::Saved {
                        x: &a.x_mid,
                        mean: &a.ln2_mean,
                        rstd: &a.ln2_rstd,
                    },
                    &bp.norm2_w,
                    Rows::new(rows, d),
                )?;
            } else {
                layernorm::backward(
                    be,
                    layernorm::Grads {
                        dx: d_out,
                        dgamma: &mut g.norm2_w,
                        dbeta: &mut g.norm2_b,
                    },
                    &s.d_ln,
                    layernorm::Saved {
                        x: &a.x_mid,
                        mean: &a.ln2_mean,
                        rstd: &a.ln2_rstd,
                    },
                    &bp.norm2_w,
                    Rows::new(rows, d),
                )?;
                be.copy(&mut s.d_sub, d_out, rows * d)?;
            }

            // Attention sub-layer: f_attn = proj(attention(q, k, v of LN1(x))).
            if let Some(f) = feature_grads {
                add::add_assign(be, &mut s.d_sub, &f[l].0, n * d)?;
            }
            let (q_shape, k_shape, v_shape) = (
                self.linear_shape(l, BlockLinear::Q),
                self.linear_shape(l, BlockLinear::K),
                self.linear_shape(l, BlockLinear::V),
            );
            if class_rows {
                // The projection on the class-token rows; the other rows of
                // the attention output and of x_in get zero gradient.
                linear_backward(
                    be,
                    &bp.proj,
                    &mut g.proj,
                    self.linear_shape(l, BlockLinear::Proj),
                    Saved {
                        rows: batch,
                        x: &acts.cls_attn,
                        h: a.h[BlockLinear::Proj].as_ref(),
                    },
                    Flow {
                        dy: &s.d_sub,
                        dx: Some((&mut s.d_cls_ln, Accumulate::Overwrite)),
                        dh: Some(&mut s.dh),
                    },
                )?;
                embed::cls_scatter_add(be, &mut s.dx, &s.d_cls, batch, t, d)?;
            } else {
                linear_backward(
                    be,
                    &bp.proj,
                    &mut g.proj,
                    self.linear_shape(l, BlockLinear::Proj),
                    Saved {
                        rows: n,
                        x: &a.attn,
                        h: a.h[BlockLinear::Proj].as_ref(),
                    },
                    Flow {
                        dy: &s.d_sub,
                        dx: Some((&mut s.d_attn, Accumulate::Overwrite)),
                        dh: Some(&mut s.dh),
                    },
                )?;
            }
            if class_rows && self.paths.class_token_query {
                // Attention and Q on the class-token rows; K and V on every token.
                attention::class_token_backward(
                    be,
                    Qkv {
                        q: &mut s.d_cls_q,
                        k: &mut s.dk,
                        v: &mut s.dv,
                    },
                    &s.d_cls_ln,
                    Qkv {
                        q: &acts.cls_q,
                        k: &a.k,
                        v: &a.v,
                    },
                    &acts.cls_probs,
                    shape,
                )?;
                linear_backward(
                    be,
                    &bp.k,
                    &mut g.k,
                    k_shape,
                    Saved {
                        rows: n,
                        x: &a.ln1,
                        h: a.h[BlockLinear::K].as_ref(),
                    },
                    Flow {
                        dy: &s.dk,
                        dx: Some((&mut s.d_ln, Accumulate::Overwrite)),
                        dh: Some(&mut s.dh),
                    },
                )?;
                linear_backward(
                    be,
                    &bp.v,
                    &mut g.v,
                    v_shape,
                    Saved {
                        rows: n,
                        x: &a.ln1,
                        h: a.h[BlockLinear::V].as_ref(),
                    },
                    Flow {
                        dy: &s.dv,
                        dx: Some((&mut s.d_ln, Accumulate::Add)),
                        dh: Some(&mut s.dh),
                    },
                )?;
                // s.d_cls_ln (read by the attention above) now takes Q's input gradient, the class-token rows of LN1's.
                linear_backward(
                    be,
                    &bp.q,
                    &mut g.q,
                    q_shape,
                    Saved {
                        rows: batch,
                        x: &acts.cls_ln1,
                        h: a.h[BlockLinear::Q].as_ref(),
                    },
                    Flow {
                        dy: &s.d_cls_q,
                        dx: Some((&mut s.d_cls_ln, Accumulate::Overwrite)),
                        dh: Some(&mut s.dh),
                    },
                )?;
                embed::cls_scatter_add(be, &mut s.d_ln, &s.d_cls_ln, batch, t, d)?;
            } else {
                if class_rows {
                    be.zero(&mut s.d_attn, n * d)?;
                    embed::cls_scatter_add(be, &mut s.d_attn, &s.d_cls_ln, batch, t, d)?;
                }
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
                linear_backward(
                    be,
                    &bp.q,
                    &mut g.q,
                    q_shape,
                    Saved {
                        rows: n,
                        x: &a.ln1,
                        h: a.h[BlockLinear::Q].as_ref(),
                    },
                    Flow {
                        dy: &s.dq,
                        dx: Some((&mut s.d_ln, Accumulate::Overwrite)),
                        dh: Some(&mut s.dh),
                    },
                )?;
                linear_backward(
                    be,
                    &bp.k,
                    &mut g.k,
                    k_shape,
                    Saved {
                        rows: n,
                        x: &a.ln1,
                        h: a.h[BlockLinear::K].as_ref(),
                    },
                    Flow {
                        dy: &s.dk,
                        dx: Some((&mut s.d_ln, Accumulate::Add)),
                        dh: Some(&mut s.dh),
                    },
                )?;
                linear_backward(
                    be,
                    &bp.v,
                    &mut g.v,
                    v_shape,
                    Saved {
                        rows: n,
                        x: &a.ln1,
                        h: a.h[BlockLinear::V].as_ref(),
                    },
                    Flow {
                        dy: &s.dv,
                        dx: Some((&mut s.d_ln, Accumulate::Add)),
                        dh: Some(&mut s.dh),
                    },
                )?;
            }
            // x_in is the previous block's output, whose MLP sub-layer starts from this dx.
            d_sub_ready = fused && l > 0;
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
                    layernorm::Saved {
                        x: &a.x_in,
                        mean: &a.ln1_mean,
                        rstd: &a.ln1_rstd,
                    },
                    &bp.norm1_w,
                    Rows::new(n, d),
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
                    layernorm::Saved {
                        x: &a.x_in,
                        mean: &a.ln1_mean,
                        rstd: &a.ln1_rstd,
                    },
                    &bp.norm1_w,
                    Rows::new(n, d),
                )?;
            }
        }

        // Embeddings.
        embed::tokens_backward(
            be,
            &mut s.d_patch_out,
            &mut grads.cls,
            &mut grads.pos,
            &s.dx,
            embed::Tokens {
                batch,
                n_patches: c.n_patches(),
                width: d,
            },
        )?;
        let np = batch * c.n_patches();
        let pd = self.patch_shape().inp;
        // dW[d, pd] += dyᵀ patches
        matmul::matmul(
            be,
            &mut grads.patch_w,
            &s.d_patch_out,
            &acts.patches,
            matmul::Gemm::new(d, pd, np).a_t().add(),
        )?;
        matmul::bias_backward(be, &mut grads.patch_b, &s.d_patch_out, np, d)
    }
}
