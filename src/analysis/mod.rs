//! Effective-rank analysis (METHOD.md "Analyze"): from measured (rank,
//! accuracy) points and the teacher's accuracy, the PCHIP curve, the
//! effective-rank region [r_lo, r_hi], the knee, compression, the spread
//! over seeds, rank suggestions for an adaptive sweep, and weight spectra.
//!
//! One file per concern: `pchip` (the interpolant), `region` (threshold
//! crossings), `knee`, `suggest` (which ranks to train next), `input`
//! (results folders, files, CSV), `spectrum` (singular values of a
//! checkpoint's weights), `report` (the numbers, summary.md's prose, the
//! terminal table), `joint` (several labelled curves together), `budget`
//! (uniform against budget students by parameter count), `plot`
//! (PNG), `output` (the files, on disk). This file holds the options and
//! ties them together.
//!
//! Compression at a rank is teacher parameters / student parameters. A
//! uniform-rank student's parameter count is exactly linear in its rank
//! (every low-rank layer holds r (in + out) weights, the rest is fixed), so
//! params(r) = a + b r is fitted exactly from two measured ranks that carry
//! parameter counts and checked against the others.

pub mod budget;
pub mod input;
pub mod joint;
pub mod knee;
pub mod output;
pub mod pchip;
pub mod plot;
pub mod region;
pub mod report;
pub mod sensitivity;
pub mod spectrum;
pub mod suggest;

pub use input::{read_measurements, Measurement, Measurements};
pub use joint::{JointReport, Labelled};
pub use knee::{Knee, KneeAxis};
pub use pchip::Pchip;
pub use region::Crossing;
pub use report::AnalysisReport;
pub use spectrum::{weight_spectra, SpectrumReport};
pub use suggest::suggest_ranks;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// What the accuracy thresholds are fractions of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reference {
    /// The teacher's accuracy A_T.
    Teacher,
    /// The curve's maximum over the measured range.
    Max,
}

/// Analysis settings.
#[derive(Clone, Debug, Serialize)]
pub struct AnalysisOptions {
    /// Lower threshold (r_lo), a fraction of the reference.
    pub lo: f64,
    /// Upper threshold (r_hi), a fraction of the reference.
    pub hi: f64,
    pub reference: Reference,
    pub knee_axis: KneeAxis,
    /// Teacher accuracy to use instead of (or in the absence of) a teacher record.
    pub teacher_acc: Option<f64>,
    /// Teacher parameter count to use instead of the records' (for a CSV).
    pub teacher_params: Option<usize>,
    /// Draw plot.png.
    pub plot: bool,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        AnalysisOptions {
            lo: 0.85,
            hi: 0.95,
            reference: Reference::Teacher,
            knee_axis: KneeAxis::Linear,
            teacher_acc: None,
            teacher_params: None,
            plot: true,
        }
    }
}

impl AnalysisOptions {
    /// Thresholds in (0, 1], lo < hi.
    pub fn check(&self) -> Result<()> {
        if !(self.lo > 0.0 && self.lo < self.hi && self.hi <= 1.0) {
            bail!(
                "thresholds must satisfy 0 < lo < hi <= 1, got lo = {} and hi = {}",
                self.lo,
                self.hi
            );
        }
        if let Some(t) = self.teacher_acc.filter(|t| !(t.is_finite() && *t > 0.0)) {
            bail!("--teacher-acc {t} must be a positive number");
        }
        Ok(())
    }
}

/// One curve's analysis (one seed, or the mean over seeds).
#[derive(Clone, Debug, Serialize)]
pub struct CurveAnalysis {
    /// "mean" or "seed N".
    pub label: String,
    /// The measured points (rank, accuracy), ascending rank.
    pub points: Vec<(f64, f64)>,
    /// The accuracy the thresholds are fractions of.
    pub reference_acc: f64,
    pub lo: Crossing,
    pub hi: Crossing,
    pub knee: Option<Knee>,
}

/// The reference accuracy for a curve.
pub fn reference_acc(p: &Pchip, teacher_acc: Option<f64>, reference: Reference) -> Result<f64> {
    match reference {
        Reference::Max => Ok(region::curve_max(p)),
        Reference::Teacher => teacher_acc.context("no teacher accuracy: the results hold no teacher record; pass --teacher-acc A or use --reference max"),
    }
}

/// Analyze one curve (points ascending in rank, at least two).
pub fn analyze_curve(
    label: &str,
    points: &[(f64, f64)],
    teacher_acc: Option<f64>,
    opts: &AnalysisOptions,
) -> Result<(CurveAnalysis, Pchip)> {
    let x: Vec<f64> = points.iter().map(|p| p.0).collect();
    let y: Vec<f64> = points.iter().map(|p| p.1).collect();
    let p = Pchip::new(&x, &y).with_context(|| format!("fitting the {label} curve"))?;
    let reference = reference_acc(&p, teacher_acc, opts.reference)?;
    let a = CurveAnalysis {
        label: label.to_string(),
        points: points.to_vec(),
        reference_acc: reference,
        lo: region::crossing(&p, opts.lo, reference),
        hi: region::crossing(&p, opts.hi, reference),
        knee: knee::knee(&p, opts.knee_axis),
    };
    Ok((a, p))
}

/// params(r) = a + b r for uniform-rank students.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ParamsFit {
    pub a: f64,
    pub b: f64,
    pub teacher_params: usize,
}

impl ParamsFit {
    /// Exact fit from the measurements' parameter counts (two distinct
    /// ranks needed; every other rank must agree). None without counts.
    pub fn from_measurements(
        m: &Measurements,
        teacher_params: Option<usize>,
    ) -> Result<Option<ParamsFit>> {
        let Some(teacher_params) = teacher_params else {
            return Ok(None);
        };
        let mut known: Vec<(usize, usize)> = m
            .points
            .iter()
            .filter_map(|p| p.params.map(|n| (p.rank, n)))
            .collect();
        known.dedup_by_key(|k| k.0);
        if known.len() < 2 {
            return Ok(None);
        }
        let ((r0, p0), (r1, p1)) = (known[0], known[known.len() - 1]);
        let b = (p1 as f64 - p0 as f64) / (r1 as f64 - r0 as f64);
        let a = p0 as f64 - b * r0 as f64;
        let fit = ParamsFit {
            a,
            b,
            teacher_params,
        };
        if let Some(&(r, n)) = known
            .iter()
            .find(|&&(r, n)| (fit.params(r) - n as f64).abs() > 0.5)
        {
            bail!("parameter counts are not linear in rank: rank {r} has {n}, the line through ranks {r0} and {r1} gives {:.0} (mixed models in one results folder?)", fit.params(r));
        }
        Ok(Some(fit))
    }

    /// Student parameters at rank r.
    pub fn params(&self, r: usize) -> f64 {
        self.a + self.b * r as f64
    }

    /// Teacher parameters / student parameters at rank r.
    pub fn compression(&self, r: usize) -> f64 {
        self.teacher_params as f64 / self.params(r)
    }
}

/// Read every results*.jsonl in `dir` (or one results/CSV file), analyze,
/// and write analysis.json, summary.md and plot.png beside the input.
pub fn analyze_folder(dir: &Path, opts: &AnalysisOptions) -> Result<AnalysisReport> {
    let m = read_measurements(dir)?;
    let report = report::analyze(&m, opts, None)?;
    let out = match dir.parent() {
        _ if dir.is_dir() => dir.to_path_buf(),
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    output::write_report(&report, &out, opts.plot)?;
    Ok(report)
}

/// When `dir` (a results folder) holds budget students: compare them with
/// its uniform-rank students by parameter count at `opts`' thresholds and
/// write budget.json and budget.png into `out`.
pub fn analyze_budgets(
    dir: &Path,
    out: &Path,
    opts: &AnalysisOptions,
) -> Result<Option<budget::BudgetReport>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let Some(report) = budget::budget_report(dir, opts.lo, opts.hi)? else {
        return Ok(None);
    };
    output::write_budget(&report, out, opts.plot)?;
    Ok(Some(report))
}

/// Analyze several labelled results folders or files together and write
/// the joint analysis.json, summary.md and plot.png into `out`.
pub fn analyze_labelled(
    inputs: &[Labelled],
    out: &Path,
    opts: &AnalysisOptions,
) -> Result<JointReport> {
    let report = joint::analyze_joint(inputs, opts)?;
    crate::durable::create_folder(out)?;
    output::write_joint(&report, out, opts.plot)?;
    Ok(report)
}
