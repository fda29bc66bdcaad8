//! The analysis as numbers (analysis.json), as prose and tables
//! (summary.md), and as the short table printed at the end of a sweep.

use super::input::Measurements;
use super::pchip::Pchip;
use super::region::{self, Crossing};
use super::spectrum::SpectrumReport;
use super::{analyze_curve, reference_acc, AnalysisOptions, CurveAnalysis, ParamsFit, Reference};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;

/// Mean, min, max and sample standard deviation (n - 1; 0 for one value)
/// of a quantity over the seeds where it is defined.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub std: f64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Stat {
            n,
            mean,
            min,
            max,
            std: var.sqrt(),
        })
    }
}

/// Spread of r_lo, r_hi and the knee over the per-seed curves.
#[derive(Clone, Debug, Serialize)]
pub struct Spread {
    pub seeds: usize,
    pub r_lo: Option<Stat>,
    pub r_hi: Option<Stat>,
    pub knee: Option<Stat>,
}

/// Compression at one named rank.
#[derive(Clone, Debug, Serialize)]
pub struct CompressionAt {
    pub what: String,
    pub rank: usize,
    pub params: f64,
    pub compression: f64,
}

/// The mean curve at one integer rank.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CurveSample {
    pub rank: usize,
    pub acc: f64,
    /// acc / reference accuracy (A_T by default).
    pub normalized: f64,
}

/// The region of the mean curve against one normalization: the same
/// thresholds as fractions of the teacher's accuracy, or of the curve's
/// maximum (METHOD.md: the reference experiment's two differ by under 0.1
/// point, so its region is the same with either).
#[derive(Clone, Debug, Serialize)]
pub struct ByReference {
    pub reference: Reference,
    pub reference_acc: f64,
    pub lo: Crossing,
    pub hi: Crossing,
}

/// Every number of an analysis.
#[derive(Clone, Debug, Serialize)]
pub struct AnalysisReport {
    pub source: String,
    pub options: AnalysisOptions,
    pub teacher_acc: Option<f64>,
    pub teacher_params: Option<usize>,
    /// The curve over the mean accuracy of every rank (the headline result).
    pub mean: CurveAnalysis,
    /// One analysis per seed (only when there are several seeds).
    pub seeds: Vec<CurveAnalysis>,
    pub spread: Option<Spread>,
    pub params_fit: Option<ParamsFit>,
    pub compression: Vec<CompressionAt>,
    /// The mean curve at every integer rank of the measured range.
    pub curve: Vec<CurveSample>,
    /// The mean curve's region against each normalization that can be
    /// computed (the teacher's accuracy when known, and the curve's
    /// maximum), whichever `options.reference` the headline uses.
    pub by_reference: Vec<ByReference>,
    pub spectrum: Option<SpectrumReport>,
}

/// Analyze measurements (the mean curve, each seed when several, compression).
pub fn analyze(
    m: &Measurements,
    opts: &AnalysisOptions,
    spectrum: Option<SpectrumReport>,
) -> Result<AnalysisReport> {
    opts.check()?;
    let teacher_acc = opts.teacher_acc.or(m.teacher_acc);
    let teacher_params = opts.teacher_params.or(m.teacher_params);
    let (mean, pchip) = analyze_curve("mean", &m.mean_curve(), teacher_acc, opts)?;
    let seeds_list = m.seeds();
    let mut seeds = Vec::new();
    if seeds_list.len() > 1 {
        for s in seeds_list {
            let points = m.seed_curve(s);
            if points.len() >= 2 {
                seeds.push(analyze_curve(&format!("seed {s}"), &points, teacher_acc, opts)?.0);
            }
        }
    }
    let spread = (!seeds.is_empty()).then(|| spread_of(&seeds));
    let params_fit = ParamsFit::from_measurements(m, teacher_params)?;
    let compression = params_fit
        .map(|f| compression_table(&mean, &f))
        .unwrap_or_default();
    let curve = super::region::integer_ranks(&pchip)
        .map(|r| {
            let acc = pchip.value(r as f64);
            CurveSample {
                rank: r,
                acc,
                normalized: acc / mean.reference_acc,
            }
        })
        .collect();
    let by_reference = both_references(&pchip, teacher_acc, opts);
    Ok(AnalysisReport {
        source: m.source.clone(),
        options: opts.clone(),
        teacher_acc,
        teacher_params,
        mean,
        seeds,
        spread,
        params_fit,
        compression,
        curve,
        by_reference,
        spectrum,
    })
}

fn both_references(
    p: &Pchip,
    teacher_acc: Option<f64>,
    opts: &AnalysisOptions,
) -> Vec<ByReference> {
    [Reference::Teacher, Reference::Max]
        .into_iter()
        .filter_map(|reference| {
            let acc = reference_acc(p, teacher_acc, reference).ok()?;
            Some(ByReference {
                reference,
                reference_acc: acc,
                lo: region::crossing(p, opts.lo, acc),
                hi: region::crossing(p, opts.hi, acc),
            })
        })
        .collect()
}

/// "teacher accuracy" or "curve maximum".
pub fn reference_name(r: Reference) -> &'static str {
    match r {
        Reference::Teacher => "teacher accuracy",
        Reference::Max => "curve maximum",
    }
}

/// "16 (exact 15.73)", "not reached".
fn crossing_text(c: &Crossing) -> String {
    match (c.rank, c.exact) {
        (Some(r), Some(x)) => format!("{r} (exact {x:.2})"),
        (r, _) => opt_rank(r),
    }
}

fn spread_of(seeds: &[CurveAnalysis]) -> Spread {
    let collect = |f: &dyn Fn(&CurveAnalysis) -> Option<usize>| {
        Stat::of(
            &seeds
                .iter()
                .filter_map(f)
                .map(|r| r as f64)
                .collect::<Vec<_>>(),
        )
    };
    Spread {
        seeds: seeds.len(),
        r_lo: collect(&|c| c.lo.rank),
        r_hi: collect(&|c| c.hi.rank),
        knee: collect(&|c| c.knee.map(|k| k.rank)),
    }
}

fn compression_table(mean: &CurveAnalysis, fit: &ParamsFit) -> Vec<CompressionAt> {
    let named = [
        ("r_lo", mean.lo.rank),
        ("r_hi", mean.hi.rank),
        ("knee", mean.knee.map(|k| k.rank)),
    ];
    named
        .iter()
        .filter_map(|&(what, r)| {
            r.map(|rank| CompressionAt {
                what: what.into(),
                rank,
                params: fit.params(rank),
                compression: fit.compression(rank),
            })
        })
        .collect()
}

fn axis_name(a: super::KneeAxis) -> &'static str {
    match a {
        super::KneeAxis::Linear => "linear",
        super::KneeAxis::Log2 => "log2",
    }
}

fn opt_rank(r: Option<usize>) -> String {
    r.map_or("not reached".into(), |r| r.to_string())
}

impl AnalysisReport {
    fn compression_of(&self, what: &str) -> String {
        self.compression
            .iter()
            .find(|c| c.what == what)
            .map_or(String::new(), |c| {
                format!(" ({:.1}x fewer parameters)", c.compression)
            })
    }

    /// The short table printed at the end of a sweep or by `analyze`.
    pub fn terminal_summary(&self) -> String {
        let m = &self.mean;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "effective-rank analysis of {} ({} ranks)",
            self.source,
            m.points.len()
        );
        let _ = writeln!(
            s,
            "  reference accuracy      {:.4} ({:?})",
            m.reference_acc, self.options.reference
        );
        for c in [&m.lo, &m.hi] {
            let exact = c.exact.map_or(String::new(), |x| format!(", exact {x:.2}"));
            let _ = writeln!(
                s,
                "  r at {:>3.0}%              {}{exact}{}",
                100.0 * c.fraction,
                opt_rank(c.rank),
                if c.fraction == self.options.lo {
                    self.compression_of("r_lo")
                } else {
                    self.compression_of("r_hi")
                }
            );
        }
        let _ = writeln!(
            s,
            "  knee ({} axis)       {}{}",
            axis_name(self.options.knee_axis),
            opt_rank(m.knee.map(|k| k.rank)),
            self.compression_of("knee")
        );
        for b in self
            .by_reference
            .iter()
            .filter(|b| b.reference != self.options.reference)
        {
            let _ = writeln!(
                s,
                "  against the {} {:.4}: r_lo {}, r_hi {}",
                reference_name(b.reference),
                b.reference_acc,
                opt_rank(b.lo.rank),
                opt_rank(b.hi.rank)
            );
        }
        if let Some(sp) = &self.spread {
            let f = |st: &Option<Stat>| {
                st.map_or("-".into(), |t| {
                    format!("{:.1} ± {:.1} [{:.0}, {:.0}]", t.mean, t.std, t.min, t.max)
                })
            };
            let _ = writeln!(
                s,
                "  over {} seeds: r_lo {}, r_hi {}, knee {}",
                sp.seeds,
                f(&sp.r_lo),
                f(&sp.r_hi),
                f(&sp.knee)
            );
        }
        for c in [&m.lo, &m.hi] {
            if c.rank.is_none() || c.exact.is_some_and(|x| x <= m.points[0].0) {
                let _ = writeln!(s, "  note: {}", c.note);
            }
        }
        s
    }

    /// summary.md: the result in words, then the tables.
    pub fn summary_md(&self) -> String {
        let m = &self.mean;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Effective-rank analysis\n\nSource: `{}`\n",
            self.source
        );
        let _ = writeln!(
            s,
            "Reference accuracy: {:.4} ({:?}; teacher accuracy {})\n",
            m.reference_acc,
            self.options.reference,
            self.teacher_acc
                .map_or("unknown".into(), |t| format!("{t:.4}"))
        );
        let _ = writeln!(s, "## Region and knee (mean curve)\n");
        let _ = writeln!(s, "- {}", m.lo.note);
        let _ = writeln!(s, "- {}", m.hi.note);
        match m.knee {
            Some(k) => {
                let _ = writeln!(
                    s,
                    "- knee (farthest from the secant, {} rank axis): rank {} (distance {:.4})",
                    axis_name(self.options.knee_axis),
                    k.rank,
                    k.distance
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "- knee: the measured range holds fewer than three integer ranks"
                );
            }
        }
        let _ = writeln!(s, "\n| quantity | rank | exact | accuracy | % of reference | compression |\n|---|---|---|---|---|---|");
        let rows = [
            ("r_lo", m.lo.rank, m.lo.exact),
            ("r_hi", m.hi.rank, m.hi.exact),
            ("knee", m.knee.map(|k| k.rank), None),
        ];
        for (what, rank, exact) in rows {
            let acc = rank
                .and_then(|r| self.curve.iter().find(|c| c.rank == r))
                .map(|c| c.acc);
            let comp = self
                .compression
                .iter()
                .find(|c| c.what == what)
                .map_or("-".into(), |c| format!("{:.2}x", c.compression));
            let _ = writeln!(
                s,
                "| {what} | {} | {} | {} | {} | {comp} |",
                opt_rank(rank),
                exact.map_or("-".into(), |x| format!("{x:.3}")),
                acc.map_or("-".into(), |a| format!("{a:.4}")),
                acc.map_or("-".into(), |a| format!(
                    "{:.1}%",
                    100.0 * a / m.reference_acc
                )),
            );
        }
        self.references_md(&mut s);
        self.seeds_md(&mut s);
        let _ = writeln!(s, "\n## Measured points\n\n| rank | accuracy (mean over seeds) | % of reference |\n|---|---|---|");
        for (r, a) in &m.points {
            let _ = writeln!(s, "| {r} | {a:.4} | {:.1}% |", 100.0 * a / m.reference_acc);
        }
        if let Some(f) = &self.params_fit {
            let _ = writeln!(s, "\nStudent parameters: {:.0} + {:.0} r (exact fit from the results); teacher {} parameters.", f.a, f.b, f.teacher_params);
        }
        if let Some(sp) = &self.spectrum {
            s.push_str(&sp.summary_md(m.lo.rank, m.hi.rank));
        }
        s
    }

    fn references_md(&self, s: &mut String) {
        let _ = writeln!(s, "\n## Both normalizations\n\n| reference | accuracy | r_lo ({:.0}%) | r_hi ({:.0}%) |\n|---|---|---|---|", 100.0 * self.options.lo, 100.0 * self.options.hi);
        for b in &self.by_reference {
            let _ = writeln!(
                s,
                "| {} | {:.4} | {} | {} |",
                reference_name(b.reference),
                b.reference_acc,
                crossing_text(&b.lo),
                crossing_text(&b.hi)
            );
        }
    }

    fn seeds_md(&self, s: &mut String) {
        let Some(sp) = &self.spread else { return };
        let _ = writeln!(s, "\n## Spread over {} seeds\n\n| quantity | mean | std | min | max | seeds reaching it |\n|---|---|---|---|---|---|", sp.seeds);
        for (what, st) in [("r_lo", sp.r_lo), ("r_hi", sp.r_hi), ("knee", sp.knee)] {
            match st {
                Some(t) => {
                    let _ = writeln!(
                        s,
                        "| {what} | {:.2} | {:.2} | {:.0} | {:.0} | {} |",
                        t.mean, t.std, t.min, t.max, t.n
                    );
                }
                None => {
                    let _ = writeln!(s, "| {what} | - | - | - | - | 0 |");
                }
            }
        }
        let _ = writeln!(s, "\n| curve | r_lo | r_hi | knee |\n|---|---|---|---|");
        for c in &self.seeds {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                c.label,
                opt_rank(c.lo.rank),
                opt_rank(c.hi.rank),
                opt_rank(c.knee.map(|k| k.rank))
            );
        }
    }
}
