//! Resumable training state: parameters, AdamW moments, optimizer step and
//! finished epochs, in one safetensors file written atomically after every
//! epoch. Tensors are named `param.<name>`, `adam_m.<name>`, `adam_v.<name>`
//! with the names of `model::params`; metadata holds `step` and `epoch`.
//! The file alone is enough to continue a run exactly where it stopped.

use super::step::Trainer;
use crate::durable::atomic_write_with;
use crate::model::params::param_specs;
use crate::ops::Backend;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

const PREFIXES: [&str; 3] = ["param", "adam_m", "adam_v"];

/// Write the trainer's state after `epoch` finished epochs.
pub fn save_train_state<B: Backend>(
    be: &B,
    path: &Path,
    trainer: &Trainer<B>,
    epoch: usize,
) -> Result<()> {
    let model = &trainer.model;
    let specs = param_specs(&model.cfg, &model.ranks);
    let params = model.to_host(be)?;
    let (m, v) = trainer.opt.to_host(be, model)?;
    let sets = [&params, &m, &v];
    let mut views = Vec::new();
    for (prefix, set) in PREFIXES.iter().zip(sets) {
        for (spec, t) in specs.iter().zip(set.tensors()) {
            views.push((
                format!("{prefix}.{}", spec.name),
                TensorView::new(Dtype::F32, spec.shape.clone(), bytemuck::cast_slice(t))?,
            ));
        }
    }
    let meta: HashMap<String, String> = [
        ("step".to_string(), trainer.opt.step.to_string()),
        ("epoch".to_string(), epoch.to_string()),
    ]
    .into();
    // Straight to the file: no copy of the state beside the one downloaded.
    atomic_write_with(path, |tmp| {
        safetensors::serialize_to_file(views, &Some(meta), tmp)
            .map_err(|e| anyhow!("writing the training state {}: {e}", path.display()))
    })
}

/// Restore parameters and optimizer state into `trainer` (whose shape must
/// match); returns the number of finished epochs.
pub fn load_train_state<B: Backend>(
    be: &B,
    path: &Path,
    trainer: &mut Trainer<B>,
) -> Result<usize> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let number = |key: &str| -> Result<usize> {
        meta.get(key)
            .ok_or_else(|| anyhow!("{}: metadata has no '{key}'", path.display()))?
            .parse::<usize>()
            .with_context(|| format!("{}: metadata '{key}' is not a number", path.display()))
    };
    let (step, epoch) = (number("step")?, number("epoch")?);
    let model = &trainer.model;
    let specs = param_specs(&model.cfg, &model.ranks);
    // Every tensor checked before any is written; then each goes from the
    // file's bytes to its buffer through one tensor's host copy, so that
    // loading holds the file and one tensor, not a second copy of the
    // state (the memory plan counts one: `memory`, "saving the training
    // state").
    let mut sets = Vec::with_capacity(PREFIXES.len());
    for prefix in PREFIXES {
        let mut views = Vec::with_capacity(specs.len());
        for spec in &specs {
            let name = format!("{prefix}.{}", spec.name);
            let t = st.tensor(&name).map_err(|_| {
                anyhow!(
                    "{}: missing tensor {name} (was the run started with another model or rank?)",
                    path.display()
                )
            })?;
            if t.shape() != spec.shape.as_slice() || t.dtype() != Dtype::F32 {
                bail!(
                    "{}: tensor {name} is {:?} {:?}, expected F32 {:?}",
                    path.display(),
                    t.dtype(),
                    t.shape(),
                    spec.shape
                );
            }
            views.push(t);
        }
        sets.push(views);
    }
    let buffers = [
        trainer.model.params.tensors_mut(),
        trainer.opt.m.tensors_mut(),
        trainer.opt.v.tensors_mut(),
    ];
    for (views, dsts) in sets.iter().zip(buffers) {
        for (view, dst) in views.iter().zip(dsts) {
            be.write(dst, &bytemuck::pod_collect_to_vec::<u8, f32>(view.data()))?;
        }
    }
    trainer.opt.step = step as u32;
    Ok(epoch)
}
