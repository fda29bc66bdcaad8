//! `effrank-engine factorize`: turn a dense teacher into a rank-r student
//! and show what each layer lost.

use super::common::{DataFlags, FactorFlags, ImportFlags, RankBoundFlags};
use super::setup::{load_data_for, load_model_with, transform_for, HostModel, ModelInput};
use anyhow::{bail, Context, Result};
use clap::Args;
use effrank_engine::analysis::sensitivity::SensitivityReport;
use effrank_engine::data::{Dataset, Normalize};
use effrank_engine::factorize::budget::{
    allocate_from_sensitivity, ranks_table, AllocationRecord, Budget, BudgetStudent,
};
use effrank_engine::factorize::{
    make_student, CalibrationData, FactorInit, LayerReport, StudentPlan,
};
use effrank_engine::model::checkpoint::save_checkpoint;
use effrank_engine::model::params::{is_lowrank, param_count, Ranks};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::provenance::{FileRef, RunMeta};
use std::path::{Path, PathBuf};

/// Factorize a teacher's q, k, v, attention-output and MLP layers (all of
/// them, or those --layers and --blocks name) at rank r: W (out x in)
/// becomes U (out x r) times V (r x in).
///
/// Examples:
///
///     effrank-engine factorize --teacher runs/teacher/model.safetensors --rank 16
///     effrank-engine factorize --teacher t.safetensors --rank 8 --layers mlp --blocks 0-5
///     effrank-engine factorize --teacher t.safetensors --rank 4 --init svd-act --calibration 256
///     effrank-engine factorize --teacher t.safetensors --budget 4x --sensitivity runs/sens
///
/// Prints a table per layer (shape, rank, parameters before and after,
/// relative Frobenius error ‖W − UV‖/‖W‖; with svd-act also the relative
/// output error ‖X(W − UV)ᵀ‖/‖XWᵀ‖ on the calibration inputs, of these
/// factors and of plain SVD's) with totals and the compression ratio, and
/// writes the student (default: student-r<R>.safetensors next to the
/// teacher, student-p<params>.safetensors for --budget). --budget chooses
/// a rank per layer instead, minimizing the sum of the layers' own KD loss
/// increases that `effrank-engine sensitivity` measured, greedily by gain
/// per parameter (docs/method.md), and prints the ranks as a table. --init svd-act calibrates on the teacher's training data (the
/// data flags below; by default the data the teacher recorded).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct FactorizeArgs {
    /// The dense teacher checkpoint (any importable naming).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Rank of every factorized layer (1..=min(out, in)).
    #[arg(long, required_unless_present = "budget", conflicts_with = "budget")]
    pub rank: Option<usize>,
    /// A parameter budget instead of one rank: the student's total
    /// parameter count (120000) or a compression factor of the teacher
    /// (4x); each layer's rank is allocated from --sensitivity's curves.
    #[arg(long, requires = "sensitivity", value_name = "N|Nx")]
    pub budget: Option<Budget>,
    /// The sensitivity pass (its folder or analysis.json) whose per-layer
    /// curves --budget allocates from (`effrank-engine sensitivity`).
    #[arg(long, value_name = "PATH")]
    pub sensitivity: Option<PathBuf>,
    #[command(flatten)]
    pub bounds: RankBoundFlags,
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
        bail!("{} does not record how its inputs are normalized, so the student could not say either: give --normalize cifar|imagenet|half|clip", args.teacher.display());
    };
    let resize = args.data.resize.or(teacher.resize);
    let plan = args.factor.plan(args.seed)?;
    let (ranks, allocation) = match (args.rank, args.budget, &args.sensitivity) {
        (Some(r), _, _) => (plan.targets.ranks(&teacher.cfg, r)?, None),
        (None, Some(budget), Some(path)) => {
            let record = allocate_budget(&args, &teacher, &plan, budget, path)?;
            (record.0, Some(record.1))
        }
        _ => bail!("give --rank R, or --budget N|Nx with --sensitivity PATH"),
    };
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
    if allocation.is_some() {
        print!("per-layer ranks:\n{}", ranks_table(&ranks));
    }
    let name = match args.rank {
        Some(r) => format!("student-r{r}.safetensors"),
        None => format!("student-p{after}.safetensors"),
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.teacher.with_file_name(name));
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
    meta.allocation = allocation;
    save_checkpoint(&out, &teacher.cfg, &ranks, &student, &meta.metadata()?)?;
    println!("student written to {}", out.display());
    Ok(())
}

/// Per-layer ranks for `budget` from the sensitivity curves at `path`
/// (only the layers the plan targets), and the record of how.
fn allocate_budget(
    args: &FactorizeArgs,
    teacher: &HostModel,
    plan: &StudentPlan,
    budget: Budget,
    path: &Path,
) -> Result<(Ranks, AllocationRecord)> {
    let report = SensitivityReport::read(path)?;
    let cfg = &teacher.cfg;
    if report.init != plan.init {
        eprintln!(
            "note: the curves were measured with {:?} factors, the student's are {:?}",
            report.init, plan.init
        );
    }
    let bounds = args.bounds.bounds();
    let file = SensitivityReport::file(path);
    let targets = plan.targets.ranks(cfg, 1)?;
    let BudgetStudent { ranks, allocation } =
        allocate_from_sensitivity(cfg, &report, &file, &targets, budget, bounds)
            .with_context(|| format!("--budget {budget} from {}", args.teacher.display()))?;
    println!(
        "budget {budget}: {} parameters allowed, {} used; predicted KD loss increase {:.4} (the sum of each layer's own)",
        allocation.budget_params, allocation.params, allocation.predicted_increase
    );
    Ok((ranks, allocation))
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
