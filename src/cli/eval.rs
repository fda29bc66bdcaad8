//! `effrank-engine eval`: top-1 and top-5 of a checkpoint on a test set,
//! optionally dumping the logits.

use super::common::{dispatch, ComputeFlags, DataFlags, ImportFlags, WithBackend};
use super::setup::{
    choose_normalize, load_data_for, load_model_with, model_input, warn_if_other_data, ModelInput,
};
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::data::Normalize;
use effrank_engine::durable::atomic_write;
use effrank_engine::factorize::budget::ranks_table;
use effrank_engine::model::params::{param_count, Ranks};
use effrank_engine::model::Vit;
use effrank_engine::ops::Backend;
use effrank_engine::options::ComputeRecord;
use effrank_engine::train::fit::evaluate;
use effrank_engine::train::Frozen;
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;

/// Evaluate a teacher or student on the test split.
///
/// Examples:
///
///     effrank-engine eval --checkpoint runs/demo/runs/r8-s0/model.safetensors
///     effrank-engine eval --checkpoint student.safetensors --data ~/cifar-100-binary --dump-logits logits.safetensors
///
/// An engine checkpoint records the data, normalization and loading it was
/// trained with; they are the defaults, so a checkpoint evaluates as its
/// run did (and the run's recorded accuracy is printed beside). Given other
/// data than it recorded, eval says so.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct EvalArgs {
    /// Checkpoint: a file (engine, timm, torchvision or Hugging Face names;
    /// safetensors or .pth) or a hub folder (config.json + model.safetensors).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataFlags,
    /// Images per forward pass (default: the batch the checkpoint's run
    /// evaluated with, so that a GPU computes the same products; else 128).
    #[arg(long)]
    pub batch: Option<usize>,
    #[command(flatten)]
    pub import: ImportFlags,
    /// Write the logits ([n, classes], F32, tensor "logits") and labels
    /// (tensor "labels", I64) to this safetensors file.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// Print the result as one JSON object (top1, top5, the accuracy the
    /// checkpoint's run recorded, data, normalization, device).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeFlags,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch == Some(0) {
        bail!("--batch must be at least 1");
    }
    dispatch(&args.compute.clone(), args.quiet, args)
}

impl WithBackend for EvalArgs {
    type Output = ();
    fn run<B: Backend>(self, be: &B, compute: &ComputeRecord) -> Result<()> {
        let m = load_model_with(&self.checkpoint, &self.import.options())?;
        let choice = self.data.choose(
            m.run.as_ref().and_then(|r| r.data.as_ref()),
            ModelInput::of(&m, &self.data),
        );
        let (_, test, data) = load_data_for(&choice, self.quiet)?;
        warn_if_other_data(
            m.run.as_ref(),
            &data,
            &format!("the checkpoint {}", self.checkpoint.display()),
        );
        if test.classes > m.cfg.classes {
            bail!(
                "the data has {} classes, the model {} only {}",
                test.classes,
                self.checkpoint.display(),
                m.cfg.classes
            );
        }
        let differ = m.import.as_ref().zip(test.class_names.as_ref());
        if let Some(warning) = differ.and_then(|(i, names)| i.class_names_differ(names)) {
            eprintln!("{warning}");
        }
        if m.normalize.is_none() && self.data.normalize.is_none() {
            eprintln!("warning: {} does not record how its inputs were normalized; using {} (give --normalize to choose)", self.checkpoint.display(), choose_normalize(None, None, &choice.source));
        }
        let (normalize, transform) = model_input(&self.data, &m, &test, &choice.source)?;
        let batch = self
            .batch
            .or(m.run.as_ref().and_then(|r| r.fit.as_ref()).map(|f| f.batch))
            .unwrap_or(128)
            .min(test.len().max(1));
        let mut model = Frozen::new(
            be,
            Vit::from_host(be, &m.cfg, &m.ranks, &m.params, compute.paths.model)?,
            batch,
        )?;
        let mut all = Vec::new();
        let (top1, top5) = evaluate(&test, batch, m.cfg.classes, |bytes, n| {
            let logits = model.logits(be, bytes, n, &transform)?;
            all.extend_from_slice(&logits);
            Ok(logits)
        })?;
        let recorded = m.run.as_ref().and_then(|r| r.recorded_top1());
        let result = EvalResult {
            checkpoint: self.checkpoint.display().to_string(),
            data: choice.source.clone(),
            normalize,
            images: test.len(),
            top1,
            top5,
            recorded_top1: recorded,
            device: be.name(),
            parameters: param_count(&m.cfg, &m.ranks),
            ranks: m.ranks.clone(),
            peak_host_bytes: effrank_engine::memory::peak_resident_bytes(),
        };
        if self.json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            let against = match recorded {
                Some(r) if r == top1 => format!(" (the run recorded the same, {:.2}%)", 100.0 * r),
                Some(r) => format!(
                    " (the run recorded {:.2}%, on its data and device)",
                    100.0 * r
                ),
                None => String::new(),
            };
            let family = if m.cfg.family.is_plain() {
                String::new()
            } else {
                format!(" ({})", m.cfg.family.describe())
            };
            println!(
                "{}{family}: top-1 {:.2}%, top-5 {:.2}% on {} test images{against}; {} parameters{}",
                result.checkpoint,
                100.0 * top1,
                100.0 * top5,
                test.len(),
                result.parameters,
                describe_ranks(&m.ranks)
            );
        }
        if let Some(path) = &self.dump_logits {
            let labels: Vec<i64> = test.labels.iter().map(|&l| l as i64).collect();
            let views = vec![
                (
                    "logits".to_string(),
                    TensorView::new(
                        Dtype::F32,
                        vec![test.len(), m.cfg.classes],
                        bytemuck::cast_slice(&all),
                    )?,
                ),
                (
                    "labels".to_string(),
                    TensorView::new(Dtype::I64, vec![test.len()], bytemuck::cast_slice(&labels))?,
                ),
            ];
            let bytes = safetensors::serialize(views, &None)?;
            atomic_write(path, &bytes)?;
            if !self.json {
                println!("logits written to {}", path.display());
            }
        }
        Ok(())
    }
}

/// What `eval --json` prints.
#[derive(serde::Serialize)]
struct EvalResult {
    checkpoint: String,
    data: String,
    normalize: Normalize,
    images: usize,
    top1: f64,
    top5: f64,
    /// The test top-1 the checkpoint's run recorded (engine checkpoints).
    recorded_top1: Option<f64>,
    device: String,
    /// The model's parameter count and its per-layer ranks (per block, in
    /// the order q, k, v, proj, fc1, fc2; null: dense).
    parameters: usize,
    ranks: Ranks,
    /// The process's peak resident memory (None where it cannot be read).
    peak_host_bytes: Option<u64>,
}

/// After the parameter count: ", dense", ", rank 4 in every layer", ", rank
/// 4 in the factorized layers, the rest dense", or the table of per-layer
/// ranks on the lines below.
fn describe_ranks(ranks: &Ranks) -> String {
    let all: Vec<Option<usize>> = ranks.iter().flat_map(|b| b.values().copied()).collect();
    let used: std::collections::BTreeSet<usize> = all.iter().flatten().copied().collect();
    match (used.first(), used.len(), all.iter().all(Option::is_some)) {
        (None, _, _) => ", dense".into(),
        (Some(r), 1, true) => format!(", rank {r} in every layer"),
        (Some(r), 1, false) => format!(", rank {r} in the factorized layers, the rest dense"),
        _ => format!("\nper-layer ranks:\n{}", ranks_table(ranks).trim_end()),
    }
}
