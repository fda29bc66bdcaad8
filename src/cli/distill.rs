//! `effrank-engine distill`: train one low-rank student against a teacher.

use super::common::{
    dispatch, ComputeFlags, DataFlags, FactorFlags, ImportFlags, LossFlags, MemoryFlags,
    TrainFlags, WithBackend,
};
use super::memory::{self, Planned};
use super::setup::{
    load_data_for, load_model_with, load_resumed_run, model_input, warn_if_other_data, ModelInput,
};
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::durable::atomic_write;
use effrank_engine::memory::{ModelShape, Plan, Storage, TeacherPlan, TrainingRun};
use effrank_engine::model::params::{dense_ranks, is_lowrank, param_count};
use effrank_engine::model::Vit;
use effrank_engine::ops::Backend;
use effrank_engine::options::ComputeRecord;
use effrank_engine::provenance::{FileRef, RunMeta, Training};
use effrank_engine::train::step::{micro_batch, shards_for};
use effrank_engine::train::{
    train_student, FitOptions, Frozen, RunFiles, StudentRun, StudentStart, Teacher,
};
use std::path::PathBuf;

/// Distill a teacher into a rank-r student and evaluate it every epoch.
///
/// Examples:
///
///     effrank-engine distill --teacher runs/teacher/model.safetensors --rank 16 --data demo --out runs/r16
///     effrank-engine distill --teacher t.safetensors --student student-r32.safetensors \
///         --loss feature --data ~/cifar-100-binary --lr 1e-4 --epochs 20 --out runs/r32
///     effrank-engine distill --teacher t.safetensors --rank 8 --layers attn --init svd-act --out runs/attn-r8
///
/// The student comes from --student, or from --rank (factorizing the teacher
/// on the fly: --init, --layers, --blocks, --from-teacher). Run the same
/// command again to resume.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct DistillArgs {
    /// The dense teacher (any importable naming).
    #[arg(long)]
    pub teacher: PathBuf,
    /// A low-rank student checkpoint to start from.
    #[arg(long, conflicts_with = "rank")]
    pub student: Option<PathBuf>,
    /// Factorize the teacher at this rank instead.
    #[arg(long)]
    pub rank: Option<usize>,
    /// How --rank factorizes the teacher.
    #[command(flatten)]
    pub factor: FactorFlags,
    #[command(flatten)]
    pub import: ImportFlags,
    #[command(flatten)]
    pub loss: LossFlags,
    #[command(flatten)]
    pub data: DataFlags,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Output folder.
    #[arg(long, default_value = "runs/distill")]
    pub out: PathBuf,
    #[command(flatten)]
    pub memory: MemoryFlags,
    #[command(flatten)]
    pub compute: ComputeFlags,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: DistillArgs) -> Result<()> {
    args.train.validate()?;
    args.loss.spec()?;
    args.factor.plan(0)?;
    if args.student.is_none() && args.rank.is_none() {
        bail!("give the student: --student CKPT, or --rank R to factorize the teacher");
    }
    dispatch(&args.compute.clone(), args.quiet, args)
}

impl WithBackend for DistillArgs {
    type Output = ();
    fn run<B: Backend>(mut self, be: &B, compute: &ComputeRecord) -> Result<()> {
        let loss = self.loss.spec()?;
        let teacher = load_model_with(&self.teacher, &self.import.options())?;
        if is_lowrank(&teacher.ranks) {
            bail!(
                "--teacher {} is a low-rank model; the teacher must be dense",
                self.teacher.display()
            );
        }
        // A resumed run keeps the data it recorded; a new one the teacher's.
        let files = RunFiles::new(&self.out);
        let resumed = load_resumed_run(&files)?;
        let choice = self.data.choose(
            resumed
                .as_ref()
                .or(teacher.run.as_ref())
                .and_then(|r| r.data.as_ref()),
            ModelInput::of(&teacher, &self.data),
        );
        let (train, test, data) = load_data_for(&choice, self.quiet)?;
        self.train.fit_batch_to(train.len());
        warn_if_other_data(
            teacher.run.as_ref(),
            &data,
            &format!("the teacher {}", self.teacher.display()),
        );
        let student_file = match &self.student {
            Some(path) => {
                let s = load_model_with(path, &self.import.options())?;
                if s.cfg != teacher.cfg {
                    bail!(
                        "student {} has shape {:?}, the teacher {:?}",
                        path.display(),
                        s.cfg,
                        teacher.cfg
                    );
                }
                Some(s)
            }
            None => None,
        };
        let (start, plan) = match (&student_file, self.rank) {
            (Some(s), _) => (
                StudentStart::Given {
                    ranks: s.ranks.clone(),
                    params: &s.params,
                },
                None,
            ),
            (None, Some(r)) => {
                let plan = self.factor.plan(self.train.seed)?;
                (
                    StudentStart::Factorize {
                        ranks: plan.targets.ranks(&teacher.cfg, r)?,
                        plan,
                    },
                    Some(plan),
                )
            }
            (None, None) => unreachable!("checked in run"),
        };
        let (normalize, transform) = model_input(&self.data, &teacher, &train, &choice.source)?;
        let dense = dense_ranks(&teacher.cfg);
        let label = self
            .rank
            .map(|r| format!("rank {r}"))
            .unwrap_or_else(|| "student".into());
        let ranks = start.ranks().clone();
        let teacher_shape = ModelShape {
            cfg: &teacher.cfg,
            ranks: &dense,
        };
        let planned = memory::plan_training(
            be,
            &self.memory,
            self.train.batch,
            self.train.accumulate,
            self.quiet,
            |batch, micro_batches| {
                Plan::training(&TrainingRun {
                    model: ModelShape {
                        cfg: &teacher.cfg,
                        ranks: &ranks,
                    },
                    batch,
                    micro_batches,
                    shards: shards_for(
                        &compute.paths.model,
                        &teacher.cfg,
                        batch.div_ceil(micro_batches),
                    ),
                    feature_loss: loss.needs_features(),
                    teacher: if loss.needs_teacher() {
                        TeacherPlan::Live(teacher_shape)
                    } else {
                        TeacherPlan::None
                    },
                    storage: Storage::of(be),
                    data_bytes: memory::data_bytes(&train, &test),
                    image_bytes: train.image_len() as u64,
                    // The teacher as loaded, and the student's start.
                    loaded_params: (param_count(&teacher.cfg, &dense)
                        + param_count(&teacher.cfg, &ranks))
                        as u64,
                })
            },
        )?;
        let micro_batches = match planned {
            Planned::Go { micro_batches } => micro_batches,
            Planned::DryRun => return Ok(()),
        };
        let fit_opts = FitOptions {
            micro_batches,
            ..self.train.fit_options(&label, self.quiet)
        };
        let training = Training {
            data: &data,
            loss: &loss,
            fit: &fit_opts,
            optimizer: self.train.optimizer(),
            compute,
        };
        let mut meta = RunMeta::student(
            normalize,
            transform.resize,
            FileRef::of(&self.teacher)?,
            plan.as_ref(),
            Some(training),
        );
        meta.import = teacher.import.clone();
        // A budget student keeps the record of how its ranks were chosen.
        meta.allocation = student_file
            .as_ref()
            .and_then(|s| s.run.as_ref())
            .and_then(|r| r.allocation.clone());
        if let Some(resumed) = &resumed {
            warn_if_other_data(
                Some(resumed),
                &data,
                &format!("the run being resumed in {}", self.out.display()),
            );
        }
        // The live teacher runs on one shard's part of a micro-batch at a
        // time; its activations hold a micro-batch.
        let mut frozen = if loss.needs_teacher() {
            Some(Frozen::for_loss(
                be,
                Vit::from_host(
                    be,
                    &teacher.cfg,
                    &dense,
                    &teacher.params,
                    compute.paths.model,
                )?,
                micro_batch(self.train.batch, micro_batches)?,
                &loss,
            )?)
        } else {
            None
        };
        let teacher_signal = match frozen.as_mut() {
            Some(f) => Teacher::Live(f),
            None => Teacher::None,
        };
        let run = StudentRun {
            cfg: &teacher.cfg,
            teacher: &teacher.params,
            start,
            train: &train,
            test: &test,
            transform: &transform,
            loss: &loss,
            fit: &fit_opts,
            optimizer: self.train.optimizer(),
            files: &files,
            meta: &meta,
            paths: compute.paths.model,
            spare_threads: None,
        };
        let summary = train_student(be, &run, teacher_signal, &mut |_| Ok(()))?;
        atomic_write(
            &self.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        let (tp, sp) = (
            param_count(&teacher.cfg, &dense),
            param_count(&teacher.cfg, &ranks),
        );
        println!(
            "student: test top-1 {:.2}%, top-5 {:.2}%; {sp} parameters ({:.2}x fewer than the teacher's {tp}){}; checkpoint {}",
            100.0 * summary.test_top1,
            100.0 * summary.test_top5,
            tp as f64 / sp as f64,
            memory::peak_note(&summary),
            files.model().display()
        );
        Ok(())
    }
}
