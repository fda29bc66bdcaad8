//! One training step and one inference pass, on any `Backend`.
//!
//! A `Learner` owns everything a step touches (model, gradients,
//! activations, optimizer state, loss buffers), allocated once for a maximum
//! batch and reused. A step: bytes → normalized images on the device →
//! forward → (teacher forward, or cached teacher logits) → fused logit loss
//! and feature losses → backward → AdamW.

use super::loss::LossSpec;
use super::optimizer::{AdamW, AdamWConfig};
use crate::device::BufKind;
use crate::ops::image::{self, ImageTransform};
use crate::ops::{loss as loss_ops, Backend};
use crate::model::{Grads, Vit, VitActs, VitBackwardScratch};
use anyhow::{bail, Result};

/// A frozen model run forward only (the teacher, or a model being evaluated).
pub struct Frozen<B: Backend> {
    pub model: Vit<B>,
    pub acts: VitActs<B>,
}

impl<B: Backend> Frozen<B> {
    pub fn new(be: &B, model: Vit<B>, max_batch: usize) -> Result<Self> {
        let acts = model.new_acts(be, max_batch)?;
        Ok(Frozen { model, acts })
    }

    /// Logits `[batch, classes]` of raw image bytes, on the host.
    pub fn logits(&mut self, be: &B, bytes: &[u8], batch: usize, transform: &ImageTransform) -> Result<Vec<f32>> {
        logits_of(be, &self.model, &mut self.acts, bytes, batch, transform)
    }
}

/// Forward `batch` images given as raw bytes; the logits on the host.
fn logits_of<B: Backend>(be: &B, model: &Vit<B>, acts: &mut VitActs<B>, bytes: &[u8], batch: usize, transform: &ImageTransform) -> Result<Vec<f32>> {
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

/// What a step reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The batch-mean loss.
    pub loss: f32,
    /// Number of samples whose top-1 prediction equals the label.
    pub correct: usize,
}

/// A model being trained, with all buffers a step needs.
pub struct Learner<B: Backend> {
    pub model: Vit<B>,
    pub grads: Grads<B>,
    pub acts: VitActs<B>,
    pub scratch: VitBackwardScratch<B>,
    pub opt: AdamW<B>,
    d_logits: B::Buf,
    loss: B::Buf,
    teacher_logits: B::Buf,
    /// Per block (d attention output, d MLP output) of the feature loss.
    feature_grads: Vec<(B::Buf, B::Buf)>,
}

impl<B: Backend> Learner<B> {
    pub fn new(be: &B, model: Vit<B>, max_batch: usize, opt: AdamWConfig) -> Result<Self> {
        let c = model.cfg.clone();
        let n = max_batch * c.tokens() * c.width;
        let feature_grads = (0..c.depth)
            .map(|_| Ok((be.alloc(n, BufKind::Activation)?, be.alloc(n, BufKind::Activation)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Learner {
            grads: model.zeros_like(be)?,
            acts: model.new_acts(be, max_batch)?,
            scratch: model.new_scratch(be, max_batch)?,
            opt: AdamW::new(be, &model, opt)?,
            d_logits: be.alloc(max_batch * c.classes, BufKind::Activation)?,
            loss: be.alloc(1, BufKind::Param)?,
            teacher_logits: be.alloc(max_batch * c.classes, BufKind::Activation)?,
            feature_grads,
            model,
        })
    }

    /// Forward, loss and backward for one batch; leaves the gradients in
    /// `self.grads` (zeroed first) and returns the loss and top-1 count.
    pub fn forward_backward(
        &mut self,
        be: &B,
        bytes: &[u8],
        labels: &[u32],
        transform: &ImageTransform,
        teacher: TeacherSignal<'_, B>,
        loss: &LossSpec,
    ) -> Result<StepStats> {
        let batch = labels.len();
        let c = self.model.cfg.clone();
        let (n, d) = (batch * c.tokens(), c.width);
        image::from_bytes(be, &mut self.acts.images, bytes, batch, transform)?;
        self.model.forward(be, &mut self.acts, batch)?;

        let mut teacher_acts: Option<&VitActs<B>> = None;
        let teacher_logits: Option<&B::Buf> = match teacher {
            TeacherSignal::None => None,
            TeacherSignal::Live(t) => {
                let img_len = batch * c.channels * c.image_size * c.image_size;
                be.copy(&mut t.acts.images, &self.acts.images, img_len)?;
                t.model.forward(be, &mut t.acts, batch)?;
                teacher_acts = Some(&t.acts);
                Some(&t.acts.logits)
            }
            TeacherSignal::Cached(logits) => {
                if logits.len() != batch * c.classes {
                    bail!("cached teacher logits hold {} values, the batch needs {} x {}", logits.len(), batch, c.classes);
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
        loss_ops::logit_loss(be, &mut self.d_logits, &mut self.loss, &self.acts.logits, teacher_logits, labels, batch, c.classes, &loss.logit_config(c.depth), 1.0)?;
        let features = match teacher_acts {
            Some(t) if loss.needs_features() => {
                let w = loss.feature_term_weight(c.depth);
                for (l, (d_attn, d_mlp)) in self.feature_grads.iter_mut().enumerate() {
                    let (s, tb) = (&self.acts.blocks[l], &t.blocks[l]);
                    be.zero(d_attn, n * d)?;
                    be.zero(d_mlp, n * d)?;
                    loss_ops::feature_loss(be, d_attn, &mut self.loss, &s.attn_out, &tb.attn_out, n, d, w)?;
                    loss_ops::feature_loss(be, d_mlp, &mut self.loss, &s.mlp_out, &tb.mlp_out, n, d, w)?;
                }
                Some(&self.feature_grads[..])
            }
            _ => None,
        };

        self.model.zero_grads(be, &mut self.grads)?;
        self.model.backward(be, &self.acts, &self.d_logits, features, &mut self.grads, &mut self.scratch, batch)?;

        let loss_value = be.download(&self.loss)?[0];
        let logits = be.download(&self.acts.logits)?;
        Ok(StepStats { loss: loss_value, correct: count_correct(&logits, labels, c.classes) })
    }

    /// Logits `[n, classes]` of raw image bytes with the current parameters
    /// (reuses the training activations).
    pub fn logits(&mut self, be: &B, bytes: &[u8], n: usize, transform: &ImageTransform) -> Result<Vec<f32>> {
        logits_of(be, &self.model, &mut self.acts, bytes, n, transform)
    }

    /// A full training step: `forward_backward`, a finiteness check, then
    /// AdamW at learning rate `lr`. A non-finite loss is an error and leaves
    /// the parameters untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        be: &B,
        bytes: &[u8],
        labels: &[u32],
        transform: &ImageTransform,
        teacher: TeacherSignal<'_, B>,
        loss: &LossSpec,
        lr: f32,
    ) -> Result<StepStats> {
        let stats = self.forward_backward(be, bytes, labels, transform, teacher, loss)?;
        if !stats.loss.is_finite() {
            bail!("the loss became {} at optimizer step {}: lower --lr, or check the data", stats.loss, self.opt.step + 1);
        }
        self.opt.update(be, &mut self.model, &self.grads, lr)?;
        Ok(stats)
    }
}

/// Number of rows of `logits [n, classes]` whose argmax equals the label.
pub fn count_correct(logits: &[f32], labels: &[u32], classes: usize) -> usize {
    labels.iter().enumerate().filter(|(i, &y)| argmax(&logits[i * classes..(i + 1) * classes]) == y as usize).count()
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
            row.iter().enumerate().filter(|&(j, &v)| j != y as usize && v >= target).count() < k
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
