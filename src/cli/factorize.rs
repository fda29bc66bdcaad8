//! `effrank-engine factorize`: turn a dense teacher into a rank-r student
//! and show what each layer lost.

use super::setup::load_model;
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::factorize::{factorize, FactorInit, LayerReport};
use effrank_engine::model::checkpoint::save_checkpoint;
use effrank_engine::data::Normalize;
use effrank_engine::model::params::{is_lowrank, param_count, uniform_ranks};
use effrank_engine::provenance::{FileRef, RunMeta};
use std::path::PathBuf;

/// Factorize every q, k, v, attention-output and MLP layer of a teacher at
/// rank r: W (out x in) becomes U (out x r) times V (r x in).
///
/// Example:
///
///     effrank-engine factorize --teacher runs/teacher/model.safetensors --rank 16
///
/// Prints a table per layer (shape, rank, parameters before and after,
/// relative Frobenius error ‖W − UV‖/‖W‖) with totals and the compression
/// ratio, and writes the student (default: student-r<R>.safetensors next to
/// the teacher).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct FactorizeArgs {
    /// The dense teacher checkpoint (any importable naming).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Rank of every factorized layer (1..=min(out, in)).
    #[arg(long)]
    pub rank: usize,
    /// svd: truncated SVD, U = U_r S^½, V = S^½ V_rᵀ (default); random: fresh factors.
    #[arg(long, default_value = "svd")]
    pub init: FactorInit,
    /// Seed of random factors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Attention heads of an imported checkpoint (default: width / 64).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Where to write the student.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Input normalization to record in the student: cifar, imagenet or half
    /// (default: the teacher's).
    #[arg(long)]
    pub normalize: Option<Normalize>,
}

pub fn run(args: FactorizeArgs) -> Result<()> {
    let teacher = load_model(&args.teacher, args.heads, None)?;
    if is_lowrank(&teacher.ranks) {
        bail!("{} is already a low-rank student; factorize a dense teacher", args.teacher.display());
    }
    let ranks = uniform_ranks(&teacher.cfg, args.rank);
    let init = match args.init {
        FactorInit::Random { .. } => FactorInit::Random { seed: args.seed },
        other => other,
    };
    let (student, reports) = factorize(&teacher.cfg, &teacher.params, &ranks, init)?;
    print_table(&reports);
    let before = param_count(&teacher.cfg, &teacher.ranks);
    let after = param_count(&teacher.cfg, &ranks);
    println!("model: {before} -> {after} parameters, {:.2}x compression", before as f64 / after as f64);
    let out = args.out.unwrap_or_else(|| args.teacher.with_file_name(format!("student-r{}.safetensors", args.rank)));
    let Some(normalize) = args.normalize.or(teacher.normalize) else {
        bail!("{} does not record how its inputs are normalized, so the student could not say either: give --normalize cifar|imagenet|half", args.teacher.display());
    };
    let mut meta = RunMeta::student(normalize, FileRef::of(&args.teacher)?, Some(init), None);
    // The student is not trained yet; it is meant for the teacher's data.
    meta.data = teacher.run.and_then(|r| r.data);
    save_checkpoint(&out, &teacher.cfg, &ranks, &student, &meta.metadata()?)?;
    println!("student written to {}", out.display());
    Ok(())
}

fn print_table(reports: &[LayerReport]) {
    println!("{:<22} {:>12} {:>5} {:>12} {:>12} {:>9}", "layer", "shape", "rank", "params", "factorized", "rel.err");
    for r in reports {
        println!("{:<22} {:>12} {:>5} {:>12} {:>12} {:>9.4}", r.name, format!("{}x{}", r.out, r.inp), r.rank, r.params_before, r.params_after, r.rel_error);
    }
    let before: usize = reports.iter().map(|r| r.params_before).sum();
    let after: usize = reports.iter().map(|r| r.params_after).sum();
    println!("{:<22} {:>12} {:>5} {:>12} {:>12} {:>8.2}x", "factorized layers", "", "", before, after, before as f64 / after.max(1) as f64);
}
