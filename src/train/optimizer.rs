//! AdamW (Loshchilov & Hutter, decoupled weight decay) over every parameter
//! of a `Vit`, with global-norm gradient clipping.
//!
//! One step: `‖g‖² = Σ over all tensors of Σ g²` (on the device), then per
//! tensor the fused `ops::adamw::update`, which scales g by
//! `min(1, max_norm / ‖g‖)` and applies bias-corrected Adam moments and the
//! decoupled decay. Weight decay applies to weight matrices only
//! (`TensorSpec::decay`).

use crate::device::BufKind;
use crate::model::params::param_specs;
use crate::model::{Grads, Vit, VitParams};
use crate::ops::adamw::{self, AdamWStep};
use crate::ops::Backend;
use anyhow::Result;

/// AdamW settings that do not change during a run.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// PyTorch's AdamW defaults with the reference experiment's decay 0.01,
    /// and clipping at norm 1.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        }
    }
}

/// The first and second moments on the host (`AdamW::to_host`).
pub type HostMoments = (VitParams<Vec<f32>>, VitParams<Vec<f32>>);

/// Optimizer state: first and second moments and the step count.
pub struct AdamW<B: Backend> {
    pub cfg: AdamWConfig,
    pub m: Grads<B>,
    pub v: Grads<B>,
    pub step: u32,
    grad_norm_sq: B::Buf,
}

impl<B: Backend> AdamW<B> {
    /// Fresh state (zero moments) for `model`.
    pub fn new(be: &B, model: &Vit<B>, cfg: AdamWConfig) -> Result<Self> {
        Ok(AdamW {
            cfg,
            m: model.zeros_like(be)?,
            v: model.zeros_like(be)?,
            step: 0,
            grad_norm_sq: be.alloc(1, BufKind::Param)?,
        })
    }

    /// One update of `model` with `grads` at learning rate `lr`.
    pub fn update(&mut self, be: &B, model: &mut Vit<B>, grads: &Grads<B>, lr: f32) -> Result<()> {
        self.step += 1;
        let specs = param_specs(&model.cfg, &model.ranks);
        be.zero(&mut self.grad_norm_sq, 1)?;
        if self.cfg.max_grad_norm.is_some() {
            for (spec, g) in specs.iter().zip(grads.tensors()) {
                adamw::sum_squares(be, &mut self.grad_norm_sq, g, spec.numel())?;
            }
        }
        let params = model.params.tensors_mut();
        let moments = self.m.tensors_mut().into_iter().zip(self.v.tensors_mut());
        for (((spec, p), g), (m, v)) in specs.iter().zip(params).zip(grads.tensors()).zip(moments) {
            let hp = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if spec.decay {
                    self.cfg.weight_decay
                } else {
                    0.0
                },
                step: self.step,
                max_grad_norm: self.cfg.max_grad_norm,
            };
            adamw::update(
                be,
                adamw::State { param: p, m, v },
                g,
                &self.grad_norm_sq,
                spec.numel(),
                &hp,
            )?;
        }
        Ok(())
    }

    /// The global gradient norm of the last `update` (synchronizes; for
    /// logging). Zero when clipping is off, since the norm is then not summed.
    pub fn last_grad_norm(&self, be: &B) -> Result<f32> {
        Ok(be.download(&self.grad_norm_sq)?[0].sqrt())
    }

    /// Moments on the host, for a resumable checkpoint.
    pub fn to_host(&self, be: &B, model: &Vit<B>) -> Result<HostMoments> {
        let m = self
            .m
            .map(&model.cfg, &model.ranks, |_, t| be.download(t))?;
        let v = self
            .v
            .map(&model.cfg, &model.ranks, |_, t| be.download(t))?;
        Ok((m, v))
    }
}
