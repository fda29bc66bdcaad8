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
//! Activations are allocated once for a maximum batch (`Vit::new_acts`) and
//! reused every step; a smaller batch uses their leading part. Inference
//! allocates two blocks' activations, whatever the depth
//! (`Vit::new_inference_acts`).

use super::block::{MlpGradient, OutputGradient, TransformerBlock};
use super::config::VitConfig;
use super::linear::LinearShape;
use super::params::{param_specs, validate_ranks, BlockLinear, PerLinear, Ranks, VitParams};
use super::pool::{self, PoolActs, PoolScratch};
use super::tokens;
use crate::device::{BufKind, Device};
use crate::ops::attention::AttentionShape;
use crate::ops::{embed, matmul, Backend};
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

/// Blocks' activations an inference pass keeps (`Vit::new_inference_acts`):
/// the one a block works in and the one it writes its output into.
const INFERENCE_SLOTS: usize = 2;

/// The rank slot `slot` of `slots` must hold for `layer`: the largest rank
/// of that layer among the blocks that take the slot (`l % slots == slot`),
/// `None` when all of them are dense.
fn slot_rank(ranks: &Ranks, slot: usize, slots: usize, layer: BlockLinear) -> Option<usize> {
    ranks
        .iter()
        .skip(slot)
        .step_by(slots)
        .filter_map(|b| b[layer])
        .max()
}

/// Block `l`'s activations and, unless it is the last of `depth`, the next
/// block's (its input): with one slot per block, slots `l` and `l + 1`; with
/// fewer (inference), slots `l % n` and `(l + 1) % n`.
fn block_and_next<T>(
    blocks: &mut [BlockActs<T>],
    l: usize,
    depth: usize,
) -> (&mut BlockActs<T>, Option<&mut BlockActs<T>>) {
    let slots = blocks.len();
    let (here, there) = (l % slots, (l + 1) % slots);
    if l + 1 == depth {
        return (&mut blocks[here], None);
    }
    if here < there {
        let (lo, hi) = blocks.split_at_mut(there);
        (&mut lo[here], Some(&mut hi[0]))
    } else {
        let (lo, hi) = blocks.split_at_mut(here);
        (&mut hi[0], Some(&mut lo[there]))
    }
}

/// What `Vit::forward_each_block` calls with each block's index and
/// activations.
pub type EachBlock<'a, T> = dyn FnMut(usize, &BlockActs<T>) -> Result<()> + 'a;

/// Where a block writes its output.
pub(super) enum BlockOut<'a, T> {
    /// A buffer: the last block's `x_out`, or its class-token rows.
    Buf(&'a mut T),
    /// The next block: its input, and on the fused path its LN1.
    Next(&'a mut BlockActs<T>),
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
    /// With LayerScale: the projection's and fc2's outputs before it (the
    /// sub-layer outputs above are after it), `[N, D]` each.
    pub attn_proj: Option<T>,
    pub mlp_fc2: Option<T>,
    /// Low-rank intermediates `h = x Vᵀ` of each layer (`None` for dense layers).
    pub h: PerLinear<Option<T>>,
}

/// The last block's activations on the class-token rows alone, the
/// class-token tail (`forward_logits`).
pub struct ClassTokenActs<T> {
    /// The block input's and LN1's class-token rows, `[batch, D]`.
    pub x_in: T,
    pub ln1: T,
    /// The class token's query, `[batch, D]`, and its attention
    /// probabilities over every token, `[batch, heads, T]`.
    pub q: T,
    pub probs: T,
    /// The attention output's class-token rows, `[batch, D]`.
    pub attn: T,
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
    /// The last block's class-token rows (`forward_logits` only).
    pub class_token: ClassTokenActs<B::Buf>,
    /// The final residual stream's class-token rows, `[batch, D]`, the
    /// final LayerNorm's output and statistics, and the logits.
    pub cls: B::Buf,
    pub cls_ln: B::Buf,
    pub cls_mean: B::Buf,
    pub cls_rstd: B::Buf,
    pub logits: B::Buf,
    /// With `norm_pre`: the tokens before it `[N, D]` and its statistics.
    pub pre: Option<(B::Buf, B::Buf, B::Buf)>,
    /// The buffers of the poolings other than `Class` (`model::pool`).
    pub pool: PoolActs<B::Buf>,
    /// The last forward pass's outputs and batch, which `backward` follows.
    forwarded: Option<(Outputs, usize)>,
}

/// Scratch buffers of the backward pass, one meaning each.
pub struct VitBackwardScratch<B: Backend> {
    /// The gradient of the residual stream at the current block's output,
    /// then (after its LN1) at its input, `[N, D]`.
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
    /// The gradient of the final residual stream's class-token rows
    /// (`acts.cls`), `[batch, D]`.
    pub d_cls: B::Buf,
    /// The gradient of the final LayerNorm's output (`acts.cls_ln`).
    pub d_cls_ln: B::Buf,
    /// Class-token tail: the gradients of the last block's class-token
    /// attention output, query and LN1 rows, `[batch, D]`.
    pub d_cls_attn: B::Buf,
    pub d_cls_q: B::Buf,
    pub d_cls_ln1: B::Buf,
    pub d_patch_out: B::Buf,
    /// With `norm_pre`: the gradient of the tokens before it, `[N, D]`.
    pub d_pre: Option<B::Buf>,
    pub pool: PoolScratch<B::Buf>,
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
        if !cfg.family.is_plain() && !paths.family_kernels {
            bail!(
                "this model ({}) needs kernels that have not yet run on this device ({}); pass --family-kernels on to run them anyway, or --device cpu",
                cfg.family.describe(),
                be.name()
            );
        }
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

    pub(super) fn linear_shape(&self, block: usize, l: BlockLinear) -> LinearShape {
        let (out, inp) = l.shape(&self.cfg);
        LinearShape {
            inp,
            out,
            rank: self.ranks[block][l],
        }
    }

    pub(super) fn patch_shape(&self) -> LinearShape {
        LinearShape {
            inp: self.cfg.patch_dim(),
            out: self.cfg.width,
            rank: None,
        }
    }

    /// Allocate activations for up to `max_batch` images: every block's,
    /// as training's backward pass and the feature loss read them.
    pub fn new_acts(&self, be: &B, max_batch: usize) -> Result<VitActs<B>> {
        self.alloc_acts(be, max_batch, self.cfg.depth)
    }

    /// Allocate activations for inference alone (forward passes; no
    /// `backward`, no feature loss): two blocks' worth, which the blocks
    /// take in turn (block `l` works in slot `l % 2` and writes its output
    /// into the other), so memory does not grow with the depth. ViT-B/32:
    /// 12 blocks' activations become 2.
    pub fn new_inference_acts(&self, be: &B, max_batch: usize) -> Result<VitActs<B>> {
        self.alloc_acts(be, max_batch, self.cfg.depth.min(INFERENCE_SLOTS))
    }

    fn alloc_acts(&self, be: &B, max_batch: usize, slots: usize) -> Result<VitActs<B>> {
        let c = &self.cfg;
        let (n, d, t) = (max_batch * c.tokens(), c.width, c.tokens());
        let a = |len: usize| be.alloc(len, BufKind::Activation);
        let stat = |len: usize| be.alloc(len, BufKind::Statistic);
        let ls = c.family.layer_scale;
        let mut blocks = Vec::with_capacity(slots);
        for slot in 0..slots {
            let mut h: PerLinear<Option<B::Buf>> = Default::default();
            for layer in BlockLinear::ALL {
                if let Some(r) = slot_rank(&self.ranks, slot, slots, layer) {
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
                attn_proj: ls.then(|| a(n * d)).transpose()?,
                mlp_fc2: ls.then(|| a(n * d)).transpose()?,
                h,
            });
        }
        let img = c.channels * c.image_size * c.image_size;
        let pre = c
            .family
            .norm_pre
            .then(|| Ok::<_, anyhow::Error>((a(n * d)?, stat(n)?, stat(n)?)))
            .transpose()?;
        let pool = pool::alloc_acts(be, self, max_batch)?;
        Ok(VitActs {
            max_batch,
            images: a(max_batch * img)?,
            patches: a(max_batch * c.n_patches() * c.patch_dim())?,
            patch_out: a(max_batch * c.n_patches() * d)?,
            blocks,
            x_out: a(n * d)?,
            class_token: ClassTokenActs {
                x_in: a(max_batch * d)?,
                ln1: a(max_batch * d)?,
                q: a(max_batch * d)?,
                probs: a(max_batch * c.heads * t)?,
                attn: a(max_batch * d)?,
            },
            cls: a(max_batch * d)?,
            cls_ln: a(max_batch * d)?,
            cls_mean: stat(max_batch)?,
            cls_rstd: stat(max_batch)?,
            logits: a(max_batch * c.classes)?,
            pre,
            pool,
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
            d_cls_attn: a(max_batch * d)?,
            d_cls_q: a(max_batch * d)?,
            d_cls_ln1: a(max_batch * d)?,
            d_patch_out: a(max_batch * c.n_patches() * d)?,
            d_pre: c.family.norm_pre.then(|| a(n * d)).transpose()?,
            pool: pool::alloc_scratch(be, self, max_batch)?,
        })
    }

    /// Forward pass over `batch` images already in `acts.images`
    /// (`[batch, channels, size, size]`, normalized). Writes every activation
    /// and `acts.logits`.
    pub fn forward(&self, be: &B, acts: &mut VitActs<B>, batch: usize) -> Result<()> {
        self.forward_to(be, acts, batch, Outputs::Everything, None)
    }

    /// `forward`, calling `each(l, block l's activations)` as soon as block
    /// `l` is done: with inference activations (`new_inference_acts`), the
    /// one moment all of a block's are there (the slot is reused two blocks
    /// later). For passes that read every block's activations, such as
    /// svd-act calibration, without keeping every block's.
    pub fn forward_each_block(
        &self,
        be: &B,
        acts: &mut VitActs<B>,
        batch: usize,
        each: &mut EachBlock<'_, B::Buf>,
    ) -> Result<()> {
        self.forward_to(be, acts, batch, Outputs::Everything, Some(each))
    }

    /// `acts.logits` only, for inference: the same logits as `forward`, but
    /// the last block's work after attention is done on the class-token rows
    /// alone, so that block's later activations (`attn_out` .. `mlp_out`)
    /// hold `batch` rows and `x_out` is not written. `backward` may follow
    /// (without feature gradients; module doc).
    pub fn forward_logits(&self, be: &B, acts: &mut VitActs<B>, batch: usize) -> Result<()> {
        self.forward_to(be, acts, batch, Outputs::LogitsOnly, None)
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
        self.forward_to(be, acts, batch, outputs, None)
    }

    fn forward_to(
        &self,
        be: &B,
        acts: &mut VitActs<B>,
        batch: usize,
        outputs: Outputs,
        mut each: Option<&mut EachBlock<'_, B::Buf>>,
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
        // Only the class token's pooling can stop at the class-token rows.
        let outputs = if c.family.pools_class_token_only() {
            outputs
        } else {
            Outputs::Everything
        };

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
        let patch = self.patch_shape();
        match &p.patch_b {
            Some(b) => matmul::linear_forward(
                be,
                &mut acts.patch_out,
                &acts.patches,
                &p.patch_w,
                b,
                patch.dense(np),
            )?,
            // CLIP's patch embedding has no bias: patch_out = patches Wpᵀ.
            None => matmul::matmul(
                be,
                &mut acts.patch_out,
                &acts.patches,
                &p.patch_w,
                matmul::Gemm::new(np, patch.out, patch.inp).b_t(),
            )?,
        }
        let pre = acts
            .pre
            .as_mut()
            .map(|(x, mean, rstd)| tokens::PreNorm { x, mean, rstd });
        tokens::forward(
            be,
            self,
            &mut acts.blocks[0].x_in,
            pre,
            &acts.patch_out,
            batch,
        )?;

        for l in 0..c.depth {
            let block = TransformerBlock { vit: self, l };
            let (a, next) = block_and_next(&mut acts.blocks, l, c.depth);
            block.kv_forward(be, a, shape)?;
            match (next, outputs) {
                (None, Outputs::LogitsOnly) => {
                    block.class_token_forward(be, a, &mut acts.class_token, &mut acts.cls, shape)?
                }
                (next, _) => {
                    block.attention_forward(be, a, shape)?;
                    let out = match next {
                        Some(next) => BlockOut::Next(next),
                        None => BlockOut::Buf(&mut acts.x_out),
                    };
                    block.tail_forward(be, a, None, out, n)?;
                    if let Some(each) = each.as_mut() {
                        each(l, a)?;
                    }
                }
            }
        }

        if !c.family.pools_class_token_only() {
            pool::forward(be, self, acts, batch)?;
            acts.forwarded = Some((outputs, batch));
            return Ok(());
        }
        if outputs == Outputs::Everything {
            embed::cls_gather(be, &mut acts.cls, &acts.x_out, batch, t, d)?;
        }
        pool::class_head_forward(be, self, acts, batch)?;
        acts.forwarded = Some((outputs, batch));
        Ok(())
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
        let (t, d) = (c.tokens(), c.width);
        let n = batch * t;
        let shape = AttentionShape {
            batch,
            tokens: t,
            heads: c.heads,
            head_dim: c.head_dim(),
        };
        if acts.blocks.len() != c.depth {
            bail!(
                "backward needs every block's activations; these were allocated for inference ({} of {} blocks)",
                acts.blocks.len(),
                c.depth
            );
        }
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

        if c.family.pools_class_token_only() {
            // Head and final LayerNorm on the class token.
            let class_rows = (&mut s.d_cls_ln, &mut s.d_cls);
            pool::class_head_backward(be, self, acts, d_logits, grads, class_rows, batch)?;
            be.zero(&mut s.dx, n * d)?;
            if !tail {
                embed::cls_scatter_add(be, &mut s.dx, &s.d_cls, batch, t, d)?;
            }
        } else {
            pool::backward(be, self, acts, d_logits, grads, s, batch)?;
        }

        // Blocks in reverse; s.dx holds the gradient of the block's output
        // (on the class-token tail, the last block's is s.d_cls, its
        // class-token rows). On the fused path a LayerNorm's backward also
        // leaves a copy of its dx in s.d_sub (`d_sub_ready`), the copy each
        // sub-layer starts from.
        let mut d_sub_ready = false;
        for l in (0..c.depth).rev() {
            let block = TransformerBlock { vit: self, l };
            let (a, g) = (&acts.blocks[l], &mut grads.blocks[l]);
            let class_rows = tail && l + 1 == c.depth;
            let from = MlpGradient {
                d_out: if class_rows {
                    OutputGradient::ClassToken
                } else {
                    OutputGradient::EveryToken
                },
                d_sub_ready,
                feature: feature_grads.map(|f| &f[l].1),
            };
            block.mlp_backward(be, a, g, s, if class_rows { batch } else { n }, from)?;
            if class_rows {
                block.class_token_backward(be, a, &acts.class_token, g, s, shape)?;
            } else {
                block.attention_backward(be, a, g, s, shape, feature_grads.map(|f| &f[l].0))?;
            }
            d_sub_ready = block.ln1_backward(be, a, g, s, n)?;
        }

        // Embeddings.
        let pre = match (&acts.pre, s.d_pre.as_mut()) {
            (Some((x, mean, rstd)), Some(dx)) => Some(tokens::PreNormSaved { x, mean, rstd, dx }),
            _ => None,
        };
        tokens::backward(be, self, grads, &s.dx, pre, &mut s.d_patch_out, batch)?;
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
        match grads.patch_b.as_mut() {
            Some(db) => matmul::bias_backward(be, db, &s.d_patch_out, np, d),
            None => Ok(()),
        }
    }
}
