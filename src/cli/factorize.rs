//! `effrank-engine factorize`: turn a dense teacher into a rank-r student
//! and show what each layer lost.

use super::common::{DataFlags, FactorFlags, ImportFlags};
use super::setup::{load_data_for, load_model_with, transform_for, HostModel, ModelInput};
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::data::{Dataset, Normalize};
use effrank_engine::factorize::{make_student, CalibrationData, FactorInit, LayerReport};
use effrank_engine::model::checkpoint::save_checkpoint;
use effrank_engine::model::params::{is_lowrank, param_count};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::provenance::{FileRef, RunMeta};
use std::path::PathBuf;

/// Factorize a teacher's q, k, v, attention-output and MLP layers (all of
/// them, or those --layers and --blocks name) at rank r: W (out x in)
/// becomes U (out x r) times V (r x in).
///
/// Examples:
///
///     effrank-engine factorize --teacher runs/teacher/model.safetensors --rank 16
///     effrank-engine factorize --teacher t.safetensors --rank 8 --layers mlp --blocks 0-5
///     effrank-engine factorize --teacher t.safetensors --rank 4 --init svd-act --calibration 256
///
/// Prints a table per layer (shape, rank, parameters before and after,
/// relative Frobenius error ‖W − UV‖/‖W‖; with svd-act also the relative
/// output error ‖X(W − UV)ᵀ‖/‖XWᵀ‖ on the calibration inputs, of these
/// factors and of plain SVD's) with totals and the compression ratio, and
/// writes the student (default: student-r<R>.safetensors next to the
/// teacher). --init svd-act calibrates on the teacher's training data (the
/// data flags below; by default the data the teacher recorded).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct FactorizeArgs {
    /// The dense teacher checkpoint (any importable naming).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Rank of every factorized layer (1..=min(out, in)).
    #[arg(long)]
    pub rank: usize,
    #[command(flatten)]
    pub factor: FactorFlags,
    /// Seed of random factors and fresh tensors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub import: ImportFlags,
    /// Where to write the student.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The data (for svd-act's calibration) and the input normalization
    /// and resize to record in the student (default: the teacher's).
    #[command(flatten)]
    pub data: DataFlags,
}

pub fn run(args: FactorizeArgs) -> Result<()> {
    let teacher = load_model_with(&args.teacher, &args.import.options())?;
    if is_lowrank(&teacher.ranks) {
        bail!(
            "{} is already a low-rank student; factorize a dense teacher",
            args.teacher.display()
        );
    }
    let Some(normalize) = args.data.normalize.or(teacher.normalize) else {
        bail!("{} does not record how its inputs are normalized, so the student could not say either: give --normalize cifar|imagenet|half", args.teacher.display());
    };
    let resize = args.data.resize.or(teacher.resize);
    let plan = args.factor.plan(args.seed)?;
    let ranks = plan.targets.ranks(&teacher.cfg, args.rank)?;
    let calibration = match plan.init {
        FactorInit::SvdAct { .. } => {
            Some(calibration_data(&args.data, &teacher, normalize, resize)?)
        }
        _ => None,
    };
    let data = calibration
        .as_ref()
        .map(|(train, transform)| CalibrationData { train, transform });
    let (student, reports) = make_student(
        &teacher.cfg,
        &teacher.params,
        &ranks,
        &plan,
        args.seed,
        data,
    )?;
    print_table(&reports);
    let before = param_count(&teacher.cfg, &teacher.ranks);
    let after = param_count(&teacher.cfg, &ranks);
    println!(
        "model ({}): {before} -> {after} parameters, {:.2}x compression",
        plan.targets,
        before as f64 / after as f64
    );
    let out = args.out.unwrap_or_else(|| {
        args.teacher
            .with_file_name(format!("student-r{}.safetensors", args.rank))
    });
    let mut meta = RunMeta::student(
        normalize,
        resize,
        FileRef::of(&args.teacher)?,
        Some(&plan),
        None,
    );
    // The student is not trained yet; it is meant for the teacher's data.
    meta.data = teacher.run.and_then(|r| r.data);
    meta.import = teacher.import;
    save_checkpoint(&out, &teacher.cfg, &ranks, &student, &meta.metadata()?)?;
    println!("student written to {}", out.display());
    Ok(())
}

/// The training images svd-act calibrates on: the data the flags name,
/// else the data the teacher recorded, as the teacher sees them.
fn calibration_data(
    flags: &DataFlags,
    teacher: &HostModel,
    normalize: Normalize,
    resize: Option<usize>,
) -> Result<(Dataset, ImageTransform)> {
    let input = ModelInput {
        side: teacher.cfg.image_size,
        resize,
    };
    let choice = flags.choose(teacher.run.as_ref().and_then(|r| r.data.as_ref()), input);
    let (train, _, _) = load_data_for(&choice, true)?;
    let transform = transform_for(&teacher.cfg, &train, normalize, resize)?;
    Ok((train, transform))
}

/// The per-layer table; with svd-act also the relative output error on
/// the calibration inputs, of these factors and of plain SVD's.
fn print_table(reports: &[LayerReport]) {
    let calibrated = reports.iter().any(|r| r.output_error.is_some());
    let outputs = |a: &str, b: &str| {
        if calibrated {
            format!(" {a:>9} {b:>9}")
        } else {
            String::new()
        }
    };
    println!(
        "{:<22} {:>12} {:>5} {:>12} {:>12} {:>9}{}",
        "layer",
        "shape",
        "rank",
        "params",
        "factorized",
        "rel.err",
        outputs("out.err", "svd.out")
    );
    for r in reports {
        let errors = outputs(
            &r.output_error.map_or("-".into(), |e| format!("{e:.4}")),
            &r.svd_output_error.map_or("-".into(), |e| format!("{e:.4}")),
        );
        println!(
            "{:<22} {:>12} {:>5} {:>12} {:>12} {:>9.4}{errors}",
            r.name,
            format!("{}x{}", r.out, r.inp),
            r.rank,
            r.params_before,
            r.params_after,
            r.rel_error
        );
    }
    let before: usize = reports.iter().map(|r| r.params_before).sum();
    let after: usize = reports.iter().map(|r| r.params_after).sum();
    println!(
        "{:<22} {:>12} {:>5} {:>12} {:>12} {:>8.2}x",
        "factorized layers",
        "",
        "",
        before,
        after,
        before as f64 / after.max(1) as f64
    );
}
