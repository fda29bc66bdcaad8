//! The files an analysis writes into its output folder, each atomically:
//! `analysis.json` and `summary.md` (report, or joint for several curves),
//! `plot.png` (plot), and with weight spectra `spectrum.json` and
//! `spectrum.png`; a sensitivity pass's `analysis.json`, `summary.md`
//! and `heatmap.png`; uniform against budget students' `budget.json`
//! and `budget.png`. The report and the
//! spectrum know their numbers and prose; the plot reads both; this file
//! ties them to disk, so neither imports the other's writer.

use super::budget::BudgetReport;
use super::joint::JointReport;
use super::plot::{plot_budget, plot_curve, plot_joint, plot_sensitivity, plot_spectrum};
use super::report::AnalysisReport;
use super::sensitivity::SensitivityReport;
use super::spectrum::SpectrumReport;
use crate::durable::atomic_write;
use anyhow::{Context, Result};
use std::path::Path;

/// Write analysis.json, summary.md and (when `plot`) plot.png into `out`,
/// and the spectrum's files when the report holds one.
pub fn write_report(report: &AnalysisReport, out: &Path, plot: bool) -> Result<()> {
    atomic_write(
        &out.join("analysis.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    atomic_write(&out.join("summary.md"), report.summary_md().as_bytes())?;
    if plot {
        plot_curve(report, &out.join("plot.png")).context("drawing plot.png")?;
    }
    if let Some(s) = &report.spectrum {
        write_spectrum(s, out, plot)?;
    }
    Ok(())
}

/// Write a joint analysis: analysis.json (`{"curves": [...]}`, each curve
/// an `AnalysisReport` with its label), summary.md and (when `plot`)
/// plot.png into `out`.
pub fn write_joint(report: &JointReport, out: &Path, plot: bool) -> Result<()> {
    atomic_write(
        &out.join("analysis.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    atomic_write(&out.join("summary.md"), report.summary_md().as_bytes())?;
    if plot {
        plot_joint(report, &out.join("plot.png")).context("drawing plot.png")?;
    }
    Ok(())
}

/// Write spectrum.json and (when `plot`) spectrum.png into `out`.
pub fn write_spectrum(s: &SpectrumReport, out: &Path, plot: bool) -> Result<()> {
    atomic_write(
        &out.join("spectrum.json"),
        serde_json::to_string_pretty(s)?.as_bytes(),
    )?;
    if plot {
        plot_spectrum(s, &out.join("spectrum.png")).context("drawing spectrum.png")?;
    }
    Ok(())
}

/// Write a sensitivity pass: analysis.json (the per-layer curves),
/// summary.md and (when `plot`) heatmap.png into `out`.
pub fn write_sensitivity(s: &SensitivityReport, out: &Path, plot: bool) -> Result<()> {
    atomic_write(
        &out.join("analysis.json"),
        serde_json::to_string_pretty(s)?.as_bytes(),
    )?;
    atomic_write(&out.join("summary.md"), s.summary_md().as_bytes())?;
    if plot {
        plot_sensitivity(s, &out.join("heatmap.png")).context("drawing heatmap.png")?;
    }
    Ok(())
}

/// Write budget.json and (when `plot`) budget.png into `out`.
pub fn write_budget(r: &BudgetReport, out: &Path, plot: bool) -> Result<()> {
    atomic_write(
        &out.join("budget.json"),
        serde_json::to_string_pretty(r)?.as_bytes(),
    )?;
    if plot {
        plot_budget(r, &out.join("budget.png")).context("drawing budget.png")?;
    }
    Ok(())
}
