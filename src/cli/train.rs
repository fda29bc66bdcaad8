//! `effrank-engine train`: train a teacher from scratch, or fine-tune one
//! from a checkpoint in any importable naming (engine, timm, torchvision,
//! Hugging Face).

use super::common::{dispatch, ComputeFlags, DataFlags, MemoryFlags, TrainFlags, WithBackend};
use super::memory::{self, Planned};
use super::recipe::{self, Recipe};
use super::setup::{
    load_data_for, load_resumed_run, model_input, warn_if_other_data, ModelProbe, ModelSource,
    ShapeOverrides,
};
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::durable::atomic_write;
use effrank_engine::memory::{ModelShape, Plan, Storage, TeacherPlan, TrainingRun};
use effrank_engine::model::import::ImportOptions;
use effrank_engine::model::params::param_count;
use effrank_engine::model::Vit;
use effrank_engine::ops::Backend;
use effrank_engine::options::ComputeRecord;
use effrank_engine::provenance::{RunMeta, Training};
use effrank_engine::train::step::shards_for;
use effrank_engine::train::{fit, FitOptions, FitRun, LossSpec, RunFiles, Teacher, Trainer};
use std::path::PathBuf;

/// Train a full-rank teacher.
///
/// Examples:
///
///     effrank-engine train --model vit-demo --data demo --epochs 12 --out runs/teacher
///     effrank-engine train --model vit-cifar --data ~/cifar-100-binary --epochs 100 --out runs/cifar-teacher
///     effrank-engine train --model vit-demo --width 96 --depth 3 --heads 3 --out runs/wider
///     effrank-engine train --init vit_b_32.safetensors --data ~/cifar-100-binary \
///         --lr 1e-4 --batch 32 --epochs 20 --out runs/b32
///     effrank-engine train --recipe reference --init vit_b_32-d86f8d99.pth \
///         --data ~/cifar-100-binary --out runs/b32-reference
///
/// Writes model.safetensors (timm names, loadable by timm), metrics.jsonl
/// (per epoch: loss, train and test top-1, images/s), state.safetensors (for
/// resuming: run the same command again) and summary.json into --out.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment, after_long_help = recipe::train_help())]
pub struct TrainArgs {
    /// Set every setting of a named protocol at once (`reference`: the
    /// paper's teacher; see the table at the end of --help); a flag given
    /// explicitly overrides the recipe's value.
    #[arg(long, value_enum)]
    pub recipe: Option<Recipe>,
    /// Model preset (`--help` lists them) or a JSON config file; ignored
    /// with --init, which takes the shape from the checkpoint.
    #[arg(long, default_value = "vit-demo", long_help = model_help())]
    pub model: String,
    /// Start from this checkpoint (engine, timm, torchvision or HF names; a
    /// file or a hub folder with its config.json); its head is replaced
    /// when the data has another number of classes.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Attention heads: overrides the preset, or sets those of an imported
    /// file that does not say them (a hub folder's config.json and
    /// torchvision's five shapes do; else width / 64, announced on stderr
    /// and recorded as guessed).
    #[arg(long)]
    pub heads: Option<usize>,
    /// The MLP's activation (gelu, gelu-tanh or quick-gelu): overrides the
    /// preset's, or sets that of an --init file that does not say it (a
    /// bare CLIP file; without it the library's default, announced on
    /// stderr and recorded as guessed).
    #[arg(long, value_name = "ACT", value_parser = crate::cli::common::parse_act)]
    pub act: Option<effrank_engine::ops::gelu::Activation>,
    /// Input size (pixels, square): overrides the preset's, or runs the
    /// --init checkpoint at this size, its position embedding resampled as
    /// timm's resample_abs_pos_embed does (bicubic, antialiased; recorded).
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Override the preset's patch size.
    #[arg(long)]
    pub patch: Option<usize>,
    /// Override the preset's width (residual stream).
    #[arg(long)]
    pub width: Option<usize>,
    /// Override the preset's number of blocks.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Override the preset's MLP hidden width.
    #[arg(long)]
    pub mlp: Option<usize>,
    #[command(flatten)]
    pub data: DataFlags,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Output folder.
    #[arg(long, default_value = "runs/teacher")]
    pub out: PathBuf,
    #[command(flatten)]
    pub memory: MemoryFlags,
    #[command(flatten)]
    pub compute: ComputeFlags,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    args.train.validate()?;
    if args.recipe.is_some() && args.init.is_none() {
        bail!("--recipe reference fine-tunes a checkpoint: give --init (e.g. torchvision's vit_b_32 .pth)");
    }
    dispatch(&args.compute.clone(), args.quiet, args)
}

impl WithBackend for TrainArgs {
    type Output = ();
    fn run<B: Backend>(mut self, be: &B, compute: &ComputeRecord) -> Result<()> {
        let source = match &self.init {
            Some(path) => ModelSource::Checkpoint {
                path: path.clone(),
                import: ImportOptions {
                    heads: self.heads,
                    act: self.act,
                    new_classes: None,
                    input_size: self.input_size,
                },
            },
            None => ModelSource::Preset {
                name: self.model.clone(),
                seed: self.train.seed,
                shape: self.shape(),
            },
        };
        // The model first: image folders are stored at the size it needs,
        // or at the size the run being resumed recorded.
        let probe = ModelProbe::new(&source)?;
        let files = RunFiles::new(&self.out);
        let resumed = load_resumed_run(&files)?;
        let choice = self.data.choose(
            resumed.as_ref().and_then(|r| r.data.as_ref()),
            probe.input(&self.data),
        );
        let (train, test, data) = load_data_for(&choice, self.quiet)?;
        self.train.fit_batch_to(train.len());
        let teacher = probe.for_classes(train.classes)?;
        let (normalize, transform) = model_input(&self.data, &teacher, &train, &choice.source)?;
        let student = ModelShape {
            cfg: &teacher.cfg,
            ranks: &teacher.ranks,
        };
        let planned = memory::plan_training(
            be,
            &self.memory,
            self.train.batch,
            self.train.accumulate,
            self.quiet,
            |batch, micro_batches| {
                Plan::training(&TrainingRun {
                    model: student,
                    batch,
                    micro_batches,
                    shards: shards_for(
                        &compute.paths.model,
                        &teacher.cfg,
                        batch.div_ceil(micro_batches),
                    ),
                    feature_loss: false,
                    teacher: TeacherPlan::None,
                    storage: Storage::of(be),
                    data_bytes: memory::data_bytes(&train, &test),
                    image_bytes: train.image_len() as u64,
                    loaded_params: param_count(&teacher.cfg, &teacher.ranks) as u64,
                })
            },
        )?;
        let micro_batches = match planned {
            Planned::Go { micro_batches } => micro_batches,
            Planned::DryRun => return Ok(()),
        };
        let model = Vit::from_host(
            be,
            &teacher.cfg,
            &teacher.ranks,
            &teacher.params,
            compute.paths.model,
        )?;
        let mut trainer = Trainer::with_accumulation(
            be,
            model,
            self.train.batch,
            micro_batches,
            self.train.optimizer(),
        )?;
        let loss = LossSpec {
            label_smoothing: self.label_smoothing,
            ..LossSpec::ce()
        };
        let fit_opts = FitOptions {
            micro_batches,
            ..self.train.fit_options("teacher", self.quiet)
        };
        let mut meta = RunMeta::teacher(
            normalize,
            transform.resize,
            Training {
                data: &data,
                loss: &loss,
                fit: &fit_opts,
                optimizer: self.train.optimizer(),
                compute,
            },
        );
        meta.import = teacher.import.clone();
        if let Some(resumed) = &resumed {
            warn_if_other_data(
                Some(resumed),
                &data,
                &format!("the run being resumed in {}", self.out.display()),
            );
        }
        if !self.quiet {
            eprintln!(
                "training {} on {} ({} train / {} test images, {} classes) on {}",
                self.model_label(),
                choice.source,
                train.len(),
                test.len(),
                train.classes,
                be.name()
            );
        }
        let summary = fit(
            be,
            &mut trainer,
            Teacher::None,
            FitRun {
                train: &train,
                test: &test,
                transform: &transform,
                loss: &loss,
                opts: &fit_opts,
            },
            &files,
            &meta,
            &mut |_| Ok(()),
        )?;
        atomic_write(
            &self.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        println!(
            "teacher: test top-1 {:.2}%, top-5 {:.2}% after {} epochs ({:.1} s{}); checkpoint {}",
            100.0 * summary.test_top1,
            100.0 * summary.test_top5,
            summary.epochs,
            summary.wall_s,
            memory::peak_note(&summary),
            files.model().display()
        );
        Ok(())
    }
}

impl TrainArgs {
    fn shape(&self) -> ShapeOverrides {
        ShapeOverrides {
            image_size: self.input_size,
            patch: self.patch,
            width: self.width,
            depth: self.depth,
            heads: self.heads,
            mlp: self.mlp,
            act: self.act,
        }
    }

    fn model_label(&self) -> String {
        match &self.init {
            Some(p) => format!("a teacher from {}", p.display()),
            None => format!("a {} teacher", self.model),
        }
    }
}

/// `--model`'s long help: the presets and their shapes.
fn model_help() -> String {
    let mut text = String::from(
        "Model preset or a JSON config file (a VitConfig); ignored with --init, which takes the shape from the checkpoint. Presets:\n",
    );
    for p in effrank_engine::model::config::PRESETS {
        text += &format!("  {:<18} {}\n", p.name, p.describe());
    }
    text
}
