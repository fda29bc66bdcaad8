//! `effrank-engine eval`: top-1 and top-5 of a checkpoint on a test set,
//! optionally dumping the logits.

use super::common::{dispatch, DataFlags, DeviceArg, WithBackend};
use super::setup::{choose_normalize, load_data_for, load_model, transform_for};
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::ops::Backend;
use effrank_engine::io::atomic_write;
use effrank_engine::model::Vit;
use effrank_engine::train::fit::evaluate;
use effrank_engine::train::Frozen;
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;

/// Evaluate a teacher or student on the test split.
///
/// Example:
///
///     effrank-engine eval --checkpoint runs/demo/teacher/model.safetensors --data demo
///     effrank-engine eval --checkpoint student.safetensors --data ~/cifar-100-binary --dump-logits logits.safetensors
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct EvalArgs {
    /// Checkpoint (engine, timm, torchvision or HF names).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub data: DataFlags,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Attention heads of an imported checkpoint (default: width / 64).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Write the logits ([n, classes], F32, tensor "logits") and labels
    /// (tensor "labels", I64) to this safetensors file.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    dispatch(args.device, args.quiet, args)
}

impl WithBackend for EvalArgs {
    type Output = ();
    fn run<B: Backend>(self, be: &B) -> Result<()> {
        let m = load_model(&self.checkpoint, self.heads, None)?;
        let (_, test) = load_data_for(&self.data, self.quiet)?;
        if test.classes > m.cfg.classes {
            bail!("the data has {} classes, the model {} only {}", test.classes, self.checkpoint.display(), m.cfg.classes);
        }
        let normalize = choose_normalize(self.data.normalize, m.normalize, &self.data.data);
        let transform = transform_for(&m.cfg, &test, normalize)?;
        let mut model = Frozen::new(be, Vit::from_host(be, &m.cfg, &m.ranks, &m.params)?, self.batch)?;
        let mut all = Vec::new();
        let (top1, top5) = evaluate(&test, self.batch, m.cfg.classes, |bytes, n| {
            let logits = model.logits(be, bytes, n, &transform)?;
            all.extend_from_slice(&logits);
            Ok(logits)
        })?;
        println!("{}: top-1 {:.2}%, top-5 {:.2}% on {} test images", self.checkpoint.display(), 100.0 * top1, 100.0 * top5, test.len());
        if let Some(path) = &self.dump_logits {
            let labels: Vec<i64> = test.labels.iter().map(|&l| l as i64).collect();
            let views = vec![
                ("logits".to_string(), TensorView::new(Dtype::F32, vec![test.len(), m.cfg.classes], bytemuck::cast_slice(&all))?),
                ("labels".to_string(), TensorView::new(Dtype::I64, vec![test.len()], bytemuck::cast_slice(&labels))?),
            ];
            let bytes = safetensors::serialize(views, &None)?;
            atomic_write(path, &bytes)?;
            println!("logits written to {}", path.display());
        }
        Ok(())
    }
}
