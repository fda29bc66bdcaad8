//! One training step and one inference pass, on any `Backend`.
//!
//! A `Trainer` owns everything a step touches (model, gradients,
//! activations, optimizer state, loss buffers), allocated once for a maximum
//! batch and reused. A step: bytes → normalized images on the device →
//! forward → (teacher forward, or cached teacher logits) → fused logit loss
//! and feature losses → backward → AdamW.

use super::loss::LossSpec;
use super::optimizer::{AdamW, AdamWConfig};
use super::spare_threads::{Loan, SpareThreads};
use crate::device::BufKind;
use crate::model::{Grads, OutputGrads, Vit, VitActs, VitBackwardScratch, VitConfig};
use crate::ops::image::{self, ImageTransform};
use crate::ops::{loss as loss_ops, Backend, Rows};
use crate::options::ModelPaths;
use anyhow::{bail, Result};

/// A frozen model run forward only (the teacher, or a model being evaluated).
pub struct Frozen<B: Backend> {
    pub model: Vit<B>,
    pub acts: VitActs<B>,
}

impl<B: Backend> Frozen<B> {
    /// A model for logits alone: inference activations
    /// (`Vit::new_inference_acts`, two blocks' worth).
    pub fn new(be: &B, model: Vit<B>, max_batch: usize) -> Result<Self> {
        let acts = model.new_inference_acts(be, max_batch)?;
        Ok(Frozen { model, acts })
    }

    /// A teacher for the feature loss, which reads every block's outputs:
    /// every block's activations.
    pub fn for_feature_loss(be: &B, model: Vit<B>, max_batch: usize) -> Result<Self> {
        let acts = model.new_acts(be, max_batch)?;
        Ok(Frozen { model, acts })
    }

    /// A teacher for `loss`: `for_feature_loss` when it reads features.
    pub fn for_loss(be: &B, model: Vit<B>, max_batch: usize, loss: &LossSpec) -> Result<Self> {
        if loss.needs_features() {
            Self::for_feature_loss(be, model, max_batch)
        } else {
            Self::new(be, model, max_batch)
        }
    }

    /// Logits `[batch, classes]` of raw image bytes, on the host.
    pub fn logits(
        &mut self,
        be: &B,
        bytes: &[u8],
        batch: usize,
        transform: &ImageTransform,
    ) -> Result<Vec<f32>> {
        logits_of(be, &self.model, &mut self.acts, bytes, batch, transform)
    }
}

/// Forward `batch` images given as raw bytes; the logits on the host.
fn logits_of<B: Backend>(
    be: &B,
    model: &Vit<B>,
    acts: &mut VitActs<B>,
    bytes: &[u8],
    batch: usize,
    transform: &ImageTransform,
) -> Result<Vec<f32>> {
    image::from_bytes(be, &mut acts.images, bytes, batch, transform)?;
    model.forward_logits(be, acts, batch)?;
    let mut logits = be.download(&acts.logits)?;
    logits.truncate(batch * model.cfg.classes);
    Ok(logits)
}

/// Where the teacher's signal for a step comes from.
pub enum TeacherSignal<'a, B: Backend> {
    /// No teacher (hard-label training).
    None,
    /// Run the teacher on the same batch (needed for the feature loss).
    Live(&'a mut Frozen<B>),
    /// Teacher logits `[batch, classes]` computed earlier for this exact batch.
    Cached(&'a [f32]),
}

/// A batch to train on: `labels.len()` images as raw bytes, their labels,
/// and the transform that makes the bytes the model's input.
#[derive(Clone, Copy)]
pub struct Batch<'a> {
    pub bytes: &'a [u8],
    pub labels: &'a [u32],
    pub transform: &'a ImageTransform,
}

/// A shard's part of a batch, its loss weighted by `weight` (its share of
/// the whole batch).
#[derive(Clone, Copy)]
struct Part<'a> {
    data: Batch<'a>,
    weight: f32,
    /// Zero the gradients first (else add to them: a later micro-batch).
    fresh: bool,
}

/// What a step reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The batch-mean loss.
    pub loss: f32,
    /// Number of samples whose top-1 prediction equals the label.
    pub correct: usize,
}

/// Halves of a batch trained at once on the CPU (see `Trainer`).
const SHARDS: usize = 2;

/// Models up to this width are small: one model's products do not keep two
/// threads busy, so a training step splits its batch (`Trainer::new`) and a
/// sweep trains a student per thread (`sweep::Parallel::Auto`; `cargo bench
/// --bench pipeline_vs_pytorch`).
pub const SMALL_MODEL_MAX_WIDTH: usize = 256;

/// A model being trained, with all buffers a step needs.
///
/// With `ModelPaths::batch_split` (the CPU's default), a model up to
/// `SMALL_MODEL_MAX_WIDTH` wide splits
/// every batch into two halves (shards), each with its own activations and
/// gradients, computed at once on half of the threads (their own rayon
/// pools); the halves' gradients are added in a fixed order (shard 0, then
/// shard 1) before AdamW, and each half's loss is weighted by its share of
/// the batch, so the step is that of the whole batch. At these widths one
/// model's products are too small to keep two threads busy: splitting at
/// every product hands work between threads hundreds of times per step,
/// splitting the batch once per step does not. The split depends only on
/// the model and the device, never on the thread count (one thread runs the
/// halves one after the other), so a run gives the same bits on any number
/// of threads. A GPU, and wider models, run the batch whole. A trainer on
/// one thread (a sweep's worker) runs its halves one after the other, or at
/// once on a thread that a finished worker lent (`borrow_from`).
pub struct Trainer<B: Backend> {
    pub model: Vit<B>,
    /// The batch's gradients (shard 0 writes here, the others are added).
    pub grads: Grads<B>,
    pub opt: AdamW<B>,
    shards: Vec<Shard<B>>,
    /// Gradients of shards 1.. (shard 0's are `grads`).
    shard_grads: Vec<Grads<B>>,
    /// One pool per shard when the shards run at once (two threads or more).
    pools: Vec<rayon::ThreadPool>,
    /// Without pools: a lent thread and a pool on it, where shard 1 runs
    /// while shard 0 runs on the calling thread.
    borrowed: Option<(Loan, rayon::ThreadPool)>,
    /// Where to borrow that thread from (`borrow_from`; none: never).
    spare: Option<SpareThreads>,
    /// The largest batch of a step (an optimizer step's images).
    max_batch: usize,
    /// The largest micro-batch: a step's batch runs forward and backward in
    /// micro-batches of at most this many images (gradient accumulation),
    /// each split into shards; the activations hold one micro-batch.
    micro_batch: usize,
}

/// The buffers of one shard: activations and loss buffers for its part of
/// the batch.
struct Shard<B: Backend> {
    acts: VitActs<B>,
    scratch: VitBackwardScratch<B>,
    d_logits: B::Buf,
    loss: B::Buf,
    teacher_logits: B::Buf,
    /// Per block (d attention output, d MLP output) of the feature loss.
    feature_grads: Vec<(B::Buf, B::Buf)>,
}

impl<B: Backend> Shard<B> {
    fn new(be: &B, model: &Vit<B>, max_batch: usize) -> Result<Self> {
        let c = &model.cfg;
        Ok(Shard {
            acts: model.new_acts(be, max_batch)?,
            scratch: model.new_scratch(be, max_batch)?,
            d_logits: be.alloc(max_batch * c.classes, BufKind::Activation)?,
            loss: be.alloc(1, BufKind::Param)?,
            teacher_logits: be.alloc(max_batch * c.classes, BufKind::Activation)?,
            feature_grads: Vec::new(),
        })
    }

    /// The feature loss's gradient buffers, allocated by the first step
    /// that needs them (a run without the feature loss never does).
    fn ensure_feature_grads(&mut self, be: &B, model: &Vit<B>) -> Result<()> {
        if self.feature_grads.is_empty() {
            let c = &model.cfg;
            let n = self.acts.max_batch * c.tokens() * c.width;
            for _ in 0..c.depth {
                self.feature_grads.push((
                    be.alloc(n, BufKind::Activation)?,
                    be.alloc(n, BufKind::Activation)?,
                ));
            }
        }
        Ok(())
    }

    /// Forward, loss and backward of this shard's part of the batch
    /// (`labels.len()` images), the loss weighted by `part.weight` (its
    /// share of the whole batch); writes `grads` (zeroed first). Returns the
    /// weighted loss and the top-1 count.
    fn forward_backward(
        &mut self,
        be: &B,
        model: &Vit<B>,
        grads: &mut Grads<B>,
        part: Part<'_>,
        teacher: TeacherSignal<'_, B>,
        loss: &LossSpec,
    ) -> Result<StepStats> {
        let Part {
            data:
                Batch {
                    bytes,
                    labels,
                    transform,
                },
            weight,
            fresh,
        } = part;
        let batch = labels.len();
        let c = &model.cfg;
        let (n, d) = (batch * c.tokens(), c.width);
        image::from_bytes(be, &mut self.acts.images, bytes, batch, transform)?;
        model.forward_for_loss(be, &mut self.acts, batch, loss.needs_features())?;

        let mut teacher_acts: Option<&VitActs<B>> = None;
        let teacher_logits: Option<&B::Buf> = match teacher {
            TeacherSignal::None => None,
            TeacherSignal::Live(t) => {
                if loss.needs_features() && t.acts.blocks.len() != t.model.cfg.depth {
                    bail!("the feature loss reads every block of the teacher: make it with `Frozen::for_feature_loss`");
                }
                let img_len = batch * c.channels * c.image_size * c.image_size;
                be.copy(&mut t.acts.images, &self.acts.images, img_len)?;
                t.model
                    .forward_for_loss(be, &mut t.acts, batch, loss.needs_features())?;
                teacher_acts = Some(&t.acts);
                Some(&t.acts.logits)
            }
            TeacherSignal::Cached(logits) => {
                if logits.len() != batch * c.classes {
                    bail!(
                        "cached teacher logits hold {} values, the batch needs {} x {}",
                        logits.len(),
                        batch,
                        c.classes
                    );
                }
                be.write(&mut self.teacher_logits, logits)?;
                Some(&self.teacher_logits)
            }
        };
        if loss.needs_teacher() && teacher_logits.is_none() {
            bail!("the loss needs a teacher (kd or feature weight > 0) but none was given");
        }
        if loss.needs_features() && teacher_acts.is_none() {
            bail!("the feature loss needs the teacher run live, not cached logits");
        }

        be.zero(&mut self.loss, 1)?;
        loss_ops::logit_loss(
            be,
            loss_ops::Outputs {
                ds: &mut self.d_logits,
                loss: &mut self.loss,
            },
            loss_ops::Logits {
                student: &self.acts.logits,
                teacher: teacher_logits,
                labels,
            },
            Rows::new(batch, c.classes),
            &loss.logit_config(c.depth),
            weight,
        )?;
        let features = match teacher_acts {
            Some(t) if loss.needs_features() => {
                let w = weight * loss.feature_term_weight(c.depth);
                self.ensure_feature_grads(be, model)?;
                for (l, (d_attn, d_mlp)) in self.feature_grads.iter_mut().enumerate() {
                    let (s, tb) = (&self.acts.blocks[l], &t.blocks[l]);
                    be.zero(d_attn, n * d)?;
                    be.zero(d_mlp, n * d)?;
                    loss_ops::feature_loss(
                        be,
                        loss_ops::Outputs {
                            ds: d_attn,
                            loss: &mut self.loss,
                        },
                        &s.attn_out,
                        &tb.attn_out,
                        Rows::new(n, d),
                        w,
                    )?;
                    loss_ops::feature_loss(
                        be,
                        loss_ops::Outputs {
                            ds: d_mlp,
                            loss: &mut self.loss,
                        },
                        &s.mlp_out,
                        &tb.mlp_out,
                        Rows::new(n, d),
                        w,
                    )?;
                }
                Some(&self.feature_grads[..])
            }
            _ => None,
        };

        if fresh {
            model.zero_grads(be, grads)?;
        }
        model.backward(
            be,
            &self.acts,
            OutputGrads {
                logits: &self.d_logits,
                features,
            },
            grads,
            &mut self.scratch,
            batch,
        )?;

        let loss_value = be.download(&self.loss)?[0];
        let logits = be.download(&self.acts.logits)?;
        Ok(StepStats {
            loss: loss_value,
            correct: count_correct(&logits, labels, c.classes),
        })
    }
}

/// Parts a micro-batch of up to `micro` images of a model of shape `cfg`
/// taking `paths` is split into (`Trainer`'s comment).
pub fn shards_for(paths: &ModelPaths, cfg: &VitConfig, micro: usize) -> usize {
    if paths.batch_split && cfg.width <= SMALL_MODEL_MAX_WIDTH && micro >= SHARDS {
        SHARDS
    } else {
        1
    }
}

/// The largest micro-batch when a batch of up to `batch` images runs as
/// `micro_batches` micro-batches (gradient accumulation).
pub fn micro_batch(batch: usize, micro_batches: usize) -> Result<usize> {
    if micro_batches == 0 || micro_batches > batch.max(1) {
        bail!("--accumulate {micro_batches}: a batch of {batch} images splits into 1 to {batch} micro-batches");
    }
    Ok(batch.div_ceil(micro_batches))
}

/// Images of each shard for a batch of `batch`: the first ⌈batch/s⌉, and
/// so on (a shard may get none).
fn shard_sizes(batch: usize, shards: usize) -> Vec<usize> {
    let per = batch.div_ceil(shards.max(1));
    (0..shards)
        .map(|s| batch.saturating_sub(s * per).min(per))
        .collect()
}

impl<B: Backend> Trainer<B> {
    /// A trainer for batches of up to `max_batch` images, split as the
    /// type's comment says.
    pub fn new(be: &B, model: Vit<B>, max_batch: usize, opt: AdamWConfig) -> Result<Self> {
        Self::with_accumulation(be, model, max_batch, 1, opt)
    }

    /// A trainer for batches of up to `max_batch` images, each computed as
    /// `micro_batches` micro-batches of at most ⌈max_batch / micro_batches⌉
    /// images whose gradients are added before one optimizer step (gradient
    /// accumulation): each micro-batch's loss is weighted by its share of
    /// the whole batch, so the step is the whole batch's up to rounding,
    /// with activations for one micro-batch.
    pub fn with_accumulation(
        be: &B,
        model: Vit<B>,
        max_batch: usize,
        micro_batches: usize,
        opt: AdamWConfig,
    ) -> Result<Self> {
        let micro = micro_batch(max_batch, micro_batches)?;
        // `--batch-split off` keeps batches whole (to pair the two ways in
        // one build; the results then differ in the last bits).
        let shards = Self::shards_for(&model, micro);
        Self::build(be, model, max_batch, micro, opt, shards)
    }

    /// Parts a micro-batch of up to `micro` images is split into on `model`'s
    /// paths (the type's comment).
    pub fn shards_for(model: &Vit<B>, micro: usize) -> usize {
        shards_for(&model.paths, &model.cfg, micro)
    }

    /// A trainer that splits every batch into `shards` parts (1: whole
    /// batches), whatever the device and model; for tests and benches.
    pub fn with_shards(
        be: &B,
        model: Vit<B>,
        max_batch: usize,
        opt: AdamWConfig,
        shards: usize,
    ) -> Result<Self> {
        Self::build(be, model, max_batch, max_batch, opt, shards)
    }

    fn build(
        be: &B,
        model: Vit<B>,
        max_batch: usize,
        micro_batch: usize,
        opt: AdamWConfig,
        shards: usize,
    ) -> Result<Self> {
        if shards == 0 || shards > micro_batch.max(1) {
            bail!("{shards} shards for batches of up to {micro_batch} images");
        }
        let per_shard = micro_batch.div_ceil(shards);
        let threads = rayon::current_num_threads();
        let pools = if shards > 1 && threads >= shards {
            (0..shards)
                .map(|_| crate::device::cpu::thread_pool(threads / shards))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Trainer {
            grads: model.zeros_like(be)?,
            shard_grads: (1..shards)
                .map(|_| model.zeros_like(be))
                .collect::<Result<_>>()?,
            shards: (0..shards)
                .map(|_| Shard::new(be, &model, per_shard))
                .collect::<Result<_>>()?,
            opt: AdamW::new(be, &model, opt)?,
            pools,
            borrowed: None,
            spare: None,
            max_batch,
            micro_batch,
            model,
        })
    }

    /// Whether the shards run at once (on pools of their own or with a
    /// borrowed thread) rather than one after the other.
    pub fn shards_at_once(&self) -> bool {
        !self.pools.is_empty() || self.borrowed.is_some()
    }

    /// Lets this trainer borrow a thread that `spare`'s lenders lent (a
    /// sweep's finished workers) to compute its two shards at once.
    pub fn borrow_from(&mut self, spare: SpareThreads) {
        self.spare = Some(spare);
    }

    /// Borrows a lent thread when two shards have no pools and one is idle.
    fn borrow_idle_thread(&mut self) -> Result<()> {
        if self.pools.is_empty() && self.borrowed.is_none() && self.shards.len() == 2 {
            if let Some(loan) = self.spare.as_ref().and_then(SpareThreads::borrow) {
                self.borrowed = Some((loan, crate::device::cpu::thread_pool(1)?));
            }
        }
        Ok(())
    }

    /// The largest batch a step takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Parts every batch is split into (1: whole batches).
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The largest micro-batch (`with_accumulation`; the batch itself
    /// without accumulation).
    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    /// Forward, loss and backward for one batch; leaves the gradients in
    /// `self.grads` (zeroed first) and returns the loss and top-1 count.
    /// The batch runs in micro-batches of at most `micro_batch()` images
    /// (one, without accumulation), in order, their gradients added.
    pub fn forward_backward(
        &mut self,
        be: &B,
        data: Batch<'_>,
        mut teacher: TeacherSignal<'_, B>,
        loss: &LossSpec,
    ) -> Result<StepStats> {
        let Batch {
            bytes,
            labels,
            transform,
        } = data;
        let batch = labels.len();
        if batch == 0 || batch > self.max_batch {
            bail!(
                "a batch of {batch} images; this trainer takes 1 to {}",
                self.max_batch
            );
        }
        let classes = self.model.cfg.classes;
        // Stored images may differ in size from the model's input (the
        // transform resizes them); all of a batch's have one size.
        if !bytes.len().is_multiple_of(batch) {
            bail!(
                "{} bytes of pixels do not divide into {batch} images",
                bytes.len()
            );
        }
        if let TeacherSignal::Cached(all) = &teacher {
            if all.len() != batch * classes {
                bail!(
                    "cached teacher logits hold {} values, the batch needs {} x {}",
                    all.len(),
                    batch,
                    classes
                );
            }
        }
        let image_bytes = bytes.len() / batch;
        let mut total = StepStats::default();
        let mut start = 0;
        while start < batch {
            let end = (start + self.micro_batch).min(batch);
            let signal = match &mut teacher {
                TeacherSignal::None => TeacherSignal::None,
                TeacherSignal::Live(t) => TeacherSignal::Live(&mut **t),
                TeacherSignal::Cached(all) => {
                    TeacherSignal::Cached(&all[start * classes..end * classes])
                }
            };
            let micro = Batch {
                bytes: &bytes[start * image_bytes..end * image_bytes],
                labels: &labels[start..end],
                transform,
            };
            let s = self.micro_forward_backward(be, micro, signal, loss, batch, start == 0)?;
            total.loss += s.loss;
            total.correct += s.correct;
            start = end;
        }
        Ok(total)
    }

    /// One micro-batch of a batch of `whole` images: split into shards, each
    /// weighted by its share of `whole`; its gradients added to
    /// `self.grads`, which it zeroes first when `first`.
    fn micro_forward_backward(
        &mut self,
        be: &B,
        data: Batch<'_>,
        teacher: TeacherSignal<'_, B>,
        loss: &LossSpec,
        whole: usize,
        first: bool,
    ) -> Result<StepStats> {
        let Batch {
            bytes,
            labels,
            transform,
        } = data;
        let batch = labels.len();
        let classes = self.model.cfg.classes;
        let image_bytes = bytes.len() / batch;
        let sizes = shard_sizes(batch, self.shards.len());
        self.borrow_idle_thread()?;
        let pools = shard_pools(&self.pools, &self.borrowed);
        let model = &self.model;
        let mut grads: Vec<&mut Grads<B>> = std::iter::once(&mut self.grads)
            .chain(self.shard_grads.iter_mut())
            .collect();
        // Each shard's images, labels and teacher signal.
        let mut parts = Vec::new();
        // `forward_backward` checked the cached logits' length and cut
        // this micro-batch's rows.
        let mut cached = match &teacher {
            TeacherSignal::Cached(all) => Some(*all),
            _ => None,
        };
        let mut start = 0;
        for &size in &sizes {
            let signal = match (&teacher, cached.as_mut()) {
                (TeacherSignal::Cached(_), Some(rest)) => {
                    let (mine, more) = rest.split_at(size * classes);
                    *rest = more;
                    Some(mine)
                }
                _ => None,
            };
            let part = Part {
                data: Batch {
                    bytes: &bytes[start * image_bytes..(start + size) * image_bytes],
                    labels: &labels[start..start + size],
                    transform,
                },
                weight: size as f32 / whole as f32,
                fresh: first || start > 0,
            };
            parts.push((part, signal));
            start += size;
        }
        let stats: Vec<Result<StepStats>> = match teacher {
            // One teacher's activations: the shards take turns.
            TeacherSignal::Live(t) => {
                let mut out = Vec::new();
                for ((shard, g), (part, _)) in
                    self.shards.iter_mut().zip(grads.iter_mut()).zip(&parts)
                {
                    if !part.data.labels.is_empty() {
                        out.push(shard.forward_backward(
                            be,
                            model,
                            g,
                            *part,
                            TeacherSignal::Live(&mut *t),
                            loss,
                        ));
                    }
                }
                out
            }
            teacher => {
                let none = matches!(teacher, TeacherSignal::None);
                let work = self
                    .shards
                    .iter_mut()
                    .zip(grads)
                    .zip(parts)
                    .filter(|(_, (part, _))| !part.data.labels.is_empty())
                    .map(|((shard, g), (part, cached))| {
                        let signal = match cached {
                            Some(logits) => TeacherSignal::Cached(logits),
                            None if none => TeacherSignal::None,
                            None => unreachable!("a cached signal is split above"),
                        };
                        move || shard.forward_backward(be, model, g, part, signal, loss)
                    });
                run_at_once(pools, work.collect())
            }
        };
        let mut total = StepStats::default();
        let used = stats.len();
        for s in stats {
            let s = s?;
            total.loss += s.loss;
            total.correct += s.correct;
        }
        // The batch's gradients: shard 0's plus the others', in order.
        for g in &self.shard_grads[..used - 1] {
            for (dst, src) in self.grads.tensors_mut().into_iter().zip(g.tensors()) {
                let len = be.len(src);
                crate::ops::add::add_assign(be, dst, src, len)?;
            }
        }
        Ok(total)
    }

    /// Logits `[n, classes]` of raw image bytes with the current parameters
    /// (reuses the training activations, a micro-batch at a time; the shards
    /// take a part each).
    pub fn logits(
        &mut self,
        be: &B,
        bytes: &[u8],
        n: usize,
        transform: &ImageTransform,
    ) -> Result<Vec<f32>> {
        if n == 0 || n > self.max_batch {
            bail!(
                "{n} images to evaluate; this trainer takes 1 to {} at a time",
                self.max_batch
            );
        }
        if !bytes.len().is_multiple_of(n) {
            bail!(
                "{} bytes of pixels do not divide into {n} images",
                bytes.len()
            );
        }
        let (image_bytes, classes) = (bytes.len() / n, self.model.cfg.classes);
        let mut logits = Vec::with_capacity(n * classes);
        for chunk in bytes.chunks(self.micro_batch * image_bytes) {
            logits.extend(self.micro_logits(be, chunk, chunk.len() / image_bytes, transform)?);
        }
        Ok(logits)
    }

    fn micro_logits(
        &mut self,
        be: &B,
        bytes: &[u8],
        n: usize,
        transform: &ImageTransform,
    ) -> Result<Vec<f32>> {
        let (image_bytes, classes) = (bytes.len() / n, self.model.cfg.classes);
        self.borrow_idle_thread()?;
        let pools = shard_pools(&self.pools, &self.borrowed);
        let model = &self.model;
        let mut start = 0;
        let mut work = Vec::new();
        let sizes = shard_sizes(n, self.shards.len());
        for (shard, size) in self.shards.iter_mut().zip(sizes) {
            if size > 0 {
                let b = &bytes[start * image_bytes..(start + size) * image_bytes];
                work.push(move || logits_of(be, model, &mut shard.acts, b, size, transform));
            }
            start += size;
        }
        let mut logits = Vec::with_capacity(n * classes);
        for part in run_at_once(pools, work) {
            logits.extend(part?);
        }
        Ok(logits)
    }

    /// A full training step: `forward_backward`, a finiteness check, then
    /// AdamW at learning rate `lr`. A non-finite loss is an error and leaves
    /// the parameters untouched.
    pub fn step(
        &mut self,
        be: &B,
        data: Batch<'_>,
        teacher: TeacherSignal<'_, B>,
        loss: &LossSpec,
        lr: f32,
    ) -> Result<StepStats> {
        let stats = self.forward_backward(be, data, teacher, loss)?;
        if !stats.loss.is_finite() {
            bail!(
                "the loss became {} at optimizer step {}: lower --lr, or check the data",
                stats.loss,
                self.opt.step + 1
            );
        }
        self.opt.update(be, &mut self.model, &self.grads, lr)?;
        Ok(stats)
    }
}

/// The pools a trainer's shards run on (see `run_at_once`): their own, or
/// the borrowed thread's.
fn shard_pools<'a>(
    pools: &'a [rayon::ThreadPool],
    borrowed: &'a Option<(Loan, rayon::ThreadPool)>,
) -> &'a [rayon::ThreadPool] {
    match borrowed {
        Some((_, pool)) => std::slice::from_ref(pool),
        None => pools,
    }
}

/// Runs the jobs at once when `pools` has one pool per job (each on its
/// own) or one fewer (the first on the calling thread, the others on the
/// pools), else one after the other on the calling thread; the results in
/// the jobs' order.
fn run_at_once<T: Send, F: FnOnce() -> T + Send>(
    pools: &[rayon::ThreadPool],
    jobs: Vec<F>,
) -> Vec<T> {
    let on_caller = jobs.len() == pools.len() + 1;
    if jobs.len() <= 1 || !(on_caller || jobs.len() == pools.len()) {
        return jobs.into_iter().map(|f| f()).collect();
    }
    std::thread::scope(|scope| {
        let mut jobs = jobs.into_iter();
        let first = jobs.next().expect("two jobs or more");
        let (first_pool, others) = if on_caller {
            (None, pools)
        } else {
            (Some(&pools[0]), &pools[1..])
        };
        let others: Vec<_> = jobs
            .zip(others)
            .map(|(f, pool)| scope.spawn(move || pool.install(f)))
            .collect();
        let mut out = vec![match first_pool {
            Some(pool) => pool.install(first),
            None => first(),
        }];
        out.extend(
            others
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
        );
        out
    })
}

/// Number of rows of `logits [n, classes]` whose argmax equals the label.
pub fn count_correct(logits: &[f32], labels: &[u32], classes: usize) -> usize {
    labels
        .iter()
        .enumerate()
        .filter(|(i, &y)| argmax(&logits[i * classes..(i + 1) * classes]) == y as usize)
        .count()
}

/// Number of rows whose label is among the `k` largest logits.
pub fn count_top_k(logits: &[f32], labels: &[u32], classes: usize, k: usize) -> usize {
    labels
        .iter()
        .enumerate()
        .filter(|(i, &y)| {
            let row = &logits[i * classes..(i + 1) * classes];
            let target = row[y as usize];
            // Ties count against the label, so a constant output is not "correct".
            row.iter()
                .enumerate()
                .filter(|&(j, &v)| j != y as usize && v >= target)
                .count()
                < k
        })
        .count()
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts() {
        let logits = [0.1, 0.9, 0.0, /* row 2 */ 0.5, 0.2, 0.3];
        assert_eq!(count_correct(&logits, &[1, 2], 3), 1);
        assert_eq!(count_top_k(&logits, &[1, 2], 3, 1), 1);
        assert_eq!(count_top_k(&logits, &[1, 2], 3, 2), 2);
        assert_eq!(count_top_k(&[1.0, 1.0], &[1], 2, 1), 0);
    }
}
