//! `effrank-engine analyze`: the effective-rank region, knee and compression
//! from a sweep's results (or a CSV), or from several of them together,
//! rank suggestions for the next trainings, and weight spectra of a
//! checkpoint.

use anyhow::{bail, Context, Result};
use clap::Args;
use effrank_engine::analysis::output::{write_report, write_spectrum};
use effrank_engine::analysis::report::analyze;
use effrank_engine::analysis::{
    analyze_budgets, analyze_labelled, read_measurements, suggest_ranks, weight_spectra,
    AnalysisOptions, KneeAxis, Labelled, Reference, SpectrumReport,
};
use effrank_engine::durable::create_folder;
use std::path::{Path, PathBuf};

/// Analyze measured accuracies per rank (PCHIP curve, region [r_lo, r_hi],
/// knee, compression, spread over seeds) and/or a checkpoint's weight spectra.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  effrank-engine analyze --results runs/sweep
  effrank-engine analyze --results points.csv --teacher-acc 0.7335 --knee-axis log2
  effrank-engine analyze --results runs/sweep --suggest 4
  effrank-engine analyze --results runs/sweep --spectrum teacher.safetensors
  effrank-engine analyze --results runs/groups/attn --results runs/groups/mlp
  effrank-engine analyze --results runs/svd --results runs/svd-act --label svd --label svd-act --out runs/inits

--results takes a sweep folder (every results*.jsonl), one results .jsonl file,
or a CSV with columns rank,accuracy[,seed][,params] (a header naming them is
optional; rows may come in any order and are sorted by rank). Writes
analysis.json, summary.md and plot.png (and spectrum.json, spectrum.png) to
--out, by default beside the input.

Several --results are analyzed together: each curve in full, under its
--label (default: its folder's or file's name), in one analysis.json
({\"curves\": [...]}), one summary table and one plot, written to --out (by
default the folder that holds them all).")]
pub struct AnalyzeArgs {
    /// Results folder, results .jsonl file or CSV; repeat for several curves.
    #[arg(long)]
    pub results: Vec<PathBuf>,
    /// Label of each --results' curve, in the same order (default: the
    /// folder's or file's name).
    #[arg(long)]
    pub label: Vec<String>,
    /// A checkpoint (.safetensors) whose weight spectra to compute.
    #[arg(long)]
    pub spectrum: Option<PathBuf>,
    /// Output folder (default: the results folder, or the input file's folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Lower threshold (r_lo) as a fraction of the reference accuracy.
    #[arg(long, default_value_t = 0.85)]
    pub lo: f64,
    /// Upper threshold (r_hi) as a fraction of the reference accuracy.
    #[arg(long, default_value_t = 0.95)]
    pub hi: f64,
    /// What the thresholds are fractions of: the teacher's accuracy or the curve's maximum.
    #[arg(long, value_enum, default_value_t = Reference::Teacher)]
    pub reference: Reference,
    /// Rank axis on which the knee's distance from the secant is measured.
    #[arg(long, value_enum, default_value_t = KneeAxis::Linear)]
    pub knee_axis: KneeAxis,
    /// Teacher accuracy (needed for a CSV with --reference teacher; overrides the results' teacher record).
    #[arg(long)]
    pub teacher_acc: Option<f64>,
    /// Teacher parameter count, for compression from a CSV with a params column.
    #[arg(long)]
    pub teacher_params: Option<usize>,
    /// Print up to N ranks to train next (those that most narrow r_lo, r_hi and the knee).
    #[arg(long, value_name = "N")]
    pub suggest: Option<usize>,
    /// Smallest rank --suggest may propose.
    #[arg(long, default_value_t = 1)]
    pub min_rank: usize,
    /// Largest rank --suggest may propose (default: the largest measured rank).
    #[arg(long)]
    pub max_rank: Option<usize>,
    /// Do not draw PNG plots.
    #[arg(long)]
    pub no_plot: bool,
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let opts = AnalysisOptions {
        lo: args.lo,
        hi: args.hi,
        reference: args.reference,
        knee_axis: args.knee_axis,
        teacher_acc: args.teacher_acc,
        teacher_params: args.teacher_params,
        plot: !args.no_plot,
    };
    opts.check()?;
    if !args.label.is_empty() && args.label.len() != args.results.len() {
        bail!(
            "{} --label for {} --results: give one label per results folder, in the same order",
            args.label.len(),
            args.results.len()
        );
    }
    let spectrum = args.spectrum.as_deref().map(weight_spectra).transpose()?;
    match args.results.as_slice() {
        [] => {
            let Some(s) = spectrum else {
                bail!("give --results DIR|FILE, --spectrum CHECKPOINT, or both (see --help)")
            };
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| folder_of(args.spectrum.as_deref().unwrap_or(Path::new("."))));
            write_spectrum_only(&s, &out, opts.plot)
        }
        [results] => analyze_one(&args, results, &opts, spectrum),
        several => analyze_several(&args, several, &opts, spectrum),
    }
}

fn write_spectrum_only(s: &SpectrumReport, out: &Path, plot: bool) -> Result<()> {
    create_folder(out)?;
    write_spectrum(s, out, plot)?;
    println!("{}", s.table_md());
    println!(
        "wrote spectrum.json{} to {}",
        if plot { " and spectrum.png" } else { "" },
        out.display()
    );
    Ok(())
}

/// Several curves: one joint analysis.
fn analyze_several(
    args: &AnalyzeArgs,
    results: &[PathBuf],
    opts: &AnalysisOptions,
    spectrum: Option<SpectrumReport>,
) -> Result<()> {
    if args.suggest.is_some() {
        bail!("--suggest proposes ranks for one curve: give a single --results");
    }
    let inputs: Vec<Labelled> = results
        .iter()
        .enumerate()
        .map(|(i, p)| Labelled {
            label: args.label.get(i).cloned().unwrap_or_else(|| name_of(p)),
            path: p.clone(),
        })
        .collect();
    let out = match &args.out {
        Some(o) => o.clone(),
        None => common_folder(results)?,
    };
    let report = analyze_labelled(&inputs, &out, opts)?;
    println!("{}", report.terminal_summary());
    println!(
        "wrote analysis.json, summary.md{} of {} curves to {}",
        if opts.plot { ", plot.png" } else { "" },
        inputs.len(),
        out.display()
    );
    match spectrum {
        Some(s) => write_spectrum_only(&s, &out, opts.plot),
        None => Ok(()),
    }
}

/// A folder's or file's own name (a file without its extension).
fn name_of(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The folder that holds every results folder or file (the common
/// ancestor of their parents), where a joint analysis goes by default:
/// beside the curves, never into one of them.
fn common_folder(results: &[PathBuf]) -> Result<PathBuf> {
    let holders = results
        .iter()
        .map(|p| {
            let abs = p.canonicalize().with_context(|| {
                format!("--results {}: no such results folder or file", p.display())
            })?;
            Ok(abs.parent().map_or(abs.clone(), Path::to_path_buf))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut common = holders[0].clone();
    while !holders.iter().all(|h| h.starts_with(&common)) {
        if !common.pop() {
            bail!("the --results have no folder in common; give --out");
        }
    }
    Ok(common)
}

/// One curve: the single-folder analysis (its files as they always were).
fn analyze_one(
    args: &AnalyzeArgs,
    results: &Path,
    opts: &AnalysisOptions,
    spectrum: Option<SpectrumReport>,
) -> Result<()> {
    let m = read_measurements(results)?;
    let report = analyze(&m, opts, spectrum)?;
    let out = args.out.clone().unwrap_or_else(|| folder_of(results));
    create_folder(&out)?;
    write_report(&report, &out, opts.plot)?;
    println!("{}", report.terminal_summary());
    if let Some(s) = &report.spectrum {
        println!("{}", s.table_md());
    }
    println!(
        "wrote analysis.json, summary.md{} to {}",
        if opts.plot { ", plot.png" } else { "" },
        out.display()
    );
    if let Some(b) = analyze_budgets(results, &out, opts)? {
        print!("{}", b.terminal_summary());
        println!(
            "wrote budget.json{} to {}",
            if opts.plot { ", budget.png" } else { "" },
            out.display()
        );
    }
    if let Some(n) = args.suggest {
        let max_rank = args
            .max_rank
            .unwrap_or_else(|| m.points.iter().map(|p| p.rank).max().unwrap_or(1));
        let next = suggest_ranks(
            &m.mean_curve(),
            report.mean.reference_acc,
            opts,
            n,
            args.min_rank,
            max_rank,
        );
        if next.is_empty() {
            println!("suggested ranks: none (r_lo and r_hi are pinned to ±1 rank and the knee is measured)");
        } else {
            println!(
                "suggested ranks: {}",
                next.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    Ok(())
}

/// The folder itself, or a file's folder ("." for a bare file name).
fn folder_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
