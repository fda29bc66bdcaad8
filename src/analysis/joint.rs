//! Several curves analyzed together (`analyze --results A --results B`,
//! `sweep --groups`): each curve gets its own full analysis (`report`),
//! under a label, and one table, one plot and one `analysis.json` hold
//! them all, so curves of different layer groups, initializations or
//! models can be read side by side.

use super::report::{analyze, reference_name, AnalysisReport};
use super::{read_measurements, AnalysisOptions};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::PathBuf;

/// A results folder or file, and the label of its curve.
#[derive(Clone, Debug)]
pub struct Labelled {
    pub label: String,
    pub path: PathBuf,
}

/// One curve of a joint analysis.
#[derive(Clone, Debug, Serialize)]
pub struct LabelledReport {
    pub label: String,
    #[serde(flatten)]
    pub report: AnalysisReport,
}

/// Every curve of a joint analysis, in the order given.
#[derive(Clone, Debug, Serialize)]
pub struct JointReport {
    pub curves: Vec<LabelledReport>,
}

/// Read and analyze every input; labels must differ.
pub fn analyze_joint(inputs: &[Labelled], opts: &AnalysisOptions) -> Result<JointReport> {
    for (i, a) in inputs.iter().enumerate() {
        if let Some(b) = inputs[..i].iter().find(|b| b.label == a.label) {
            bail!(
                "two curves are labelled '{}' ({} and {}); give each --results its own --label",
                a.label,
                b.path.display(),
                a.path.display()
            );
        }
    }
    let curves = inputs
        .iter()
        .map(|input| {
            let m = read_measurements(&input.path)
                .with_context(|| format!("curve '{}'", input.label))?;
            let report = analyze(&m, opts, None).with_context(|| {
                format!(
                    "analyzing curve '{}' ({})",
                    input.label,
                    input.path.display()
                )
            })?;
            Ok(LabelledReport {
                label: input.label.clone(),
                report,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(JointReport { curves })
}

fn rank_text(r: Option<usize>) -> String {
    r.map_or("-".into(), |r| r.to_string())
}

impl LabelledReport {
    /// Parameters and compression at one of the named ranks (r_lo, r_hi, knee).
    fn params_at(&self, what: &str) -> (String, String) {
        match self.report.compression.iter().find(|c| c.what == what) {
            Some(c) => (format!("{:.0}", c.params), format!("{:.2}x", c.compression)),
            None => ("-".into(), "-".into()),
        }
    }

    fn row(&self) -> [String; 6] {
        let m = &self.report.mean;
        let (knee_params, knee_compression) = self.params_at("knee");
        [
            self.label.clone(),
            format!("{:.4}", m.reference_acc),
            rank_text(m.lo.rank),
            rank_text(m.hi.rank),
            rank_text(m.knee.map(|k| k.rank)),
            format!("{knee_params} ({knee_compression})"),
        ]
    }
}

impl JointReport {
    /// The one table, as printed at the end of `analyze` and `sweep --groups`.
    pub fn terminal_summary(&self) -> String {
        let mut s = format!("effective-rank analysis of {} curves\n", self.curves.len());
        let _ = writeln!(
            s,
            "  {:<16} {:>9} {:>6} {:>6} {:>6}  params at the knee (compression)",
            "curve", "reference", "r_lo", "r_hi", "knee"
        );
        for c in &self.curves {
            let [label, acc, lo, hi, knee, params] = c.row();
            let _ = writeln!(
                s,
                "  {label:<16} {acc:>9} {lo:>6} {hi:>6} {knee:>6}  {params}"
            );
        }
        s
    }

    /// summary.md: the table of regions, knees and parameter counts, both
    /// normalizations, and every measured point.
    pub fn summary_md(&self) -> String {
        let mut s = format!(
            "# Effective-rank analysis of {} curves\n\n",
            self.curves.len()
        );
        let Some(first) = self.curves.first() else {
            return s;
        };
        let o = &first.report.options;
        let _ = writeln!(
            s,
            "Thresholds {:.0}% and {:.0}% of the reference ({}).\n",
            100.0 * o.lo,
            100.0 * o.hi,
            reference_name(o.reference)
        );
        let _ = writeln!(s, "| curve | source | reference | r_lo | r_hi | knee | parameters at r_lo | at r_hi | at the knee | compression at the knee | student parameters |\n|---|---|---|---|---|---|---|---|---|---|---|");
        for c in &self.curves {
            let r = &c.report;
            let [label, acc, lo, hi, knee, _] = c.row();
            let at = |what| c.params_at(what).0;
            let fit = r
                .params_fit
                .map_or("-".into(), |f| format!("{:.0} + {:.0} r", f.a, f.b));
            let _ = writeln!(
                s,
                "| {label} | `{}` | {acc} | {lo} | {hi} | {knee} | {} | {} | {} | {} | {fit} |",
                r.source,
                at("r_lo"),
                at("r_hi"),
                at("knee"),
                c.params_at("knee").1
            );
        }
        let _ = writeln!(s, "\n## Both normalizations\n\n| curve | reference | accuracy | r_lo | r_hi |\n|---|---|---|---|---|");
        for c in &self.curves {
            for b in &c.report.by_reference {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.4} | {} | {} |",
                    c.label,
                    reference_name(b.reference),
                    b.reference_acc,
                    rank_text(b.lo.rank),
                    rank_text(b.hi.rank)
                );
            }
        }
        self.points_md(&mut s);
        s
    }

    /// Every measured rank, one column per curve (mean over seeds).
    fn points_md(&self, s: &mut String) {
        let mut ranks: Vec<f64> = self
            .curves
            .iter()
            .flat_map(|c| c.report.mean.points.iter().map(|p| p.0))
            .collect();
        ranks.sort_by(f64::total_cmp);
        ranks.dedup();
        let labels: Vec<&str> = self.curves.iter().map(|c| c.label.as_str()).collect();
        let _ = writeln!(
            s,
            "\n## Measured points (mean accuracy over seeds)\n\n| rank | {} |\n|---|{}",
            labels.join(" | "),
            "---|".repeat(labels.len())
        );
        for r in ranks {
            let cells: Vec<String> = self
                .curves
                .iter()
                .map(|c| {
                    c.report
                        .mean
                        .points
                        .iter()
                        .find(|p| p.0 == r)
                        .map_or("-".into(), |p| format!("{:.4}", p.1))
                })
                .collect();
            let _ = writeln!(s, "| {r} | {} |", cells.join(" | "));
        }
    }
}
