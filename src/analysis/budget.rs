//! Accuracy against parameter count for the two kinds of student of one
//! results folder: uniform-rank students (`sweep --ranks`) and budget
//! students, whose per-layer ranks were allocated for a parameter count
//! (`sweep --budgets`). Each kind is one curve of mean top-1 over seeds
//! against the student's parameter count, interpolated by PCHIP (as the
//! rank curve is), and where it first reaches the `lo` and `hi` fractions
//! of the teacher's accuracy is read on the parameter axis; students of
//! both kinds with the same parameter count are set side by side.
//! Written as `budget.json` and `budget.png` beside the rank analysis.

use super::pchip::Pchip;
use crate::model::params::Ranks;
use crate::results::{read_records, Record, StudentRecord};
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// One student size: every seed's top-1 and their mean.
#[derive(Clone, Debug, Serialize)]
pub struct SizePoint {
    pub params: usize,
    /// `r<rank>` for a uniform student, `b<budget>` for a budget student.
    pub name: String,
    pub mean: f64,
    /// (seed, top-1), ascending seed.
    pub seeds: Vec<(u64, f64)>,
    /// A budget student's per-layer ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranks: Option<Ranks>,
}

/// Where a curve first reaches `fraction` of the teacher's top-1, in
/// parameters.
#[derive(Clone, Debug, Serialize)]
pub struct ParamCrossing {
    pub fraction: f64,
    pub level: f64,
    /// None when the curve stays below the level over the measured sizes,
    /// or has fewer than two.
    pub params: Option<f64>,
    /// Teacher parameters / `params`.
    pub compression: Option<f64>,
    pub note: String,
}

/// One kind of student: its sizes, ascending, and its crossings.
#[derive(Clone, Debug, Serialize)]
pub struct SizeCurve {
    pub kind: String,
    pub points: Vec<SizePoint>,
    pub crossings: Vec<ParamCrossing>,
}

/// A uniform and a budget student of the same parameter count.
#[derive(Clone, Debug, Serialize)]
pub struct SameSize {
    pub params: usize,
    pub uniform: String,
    pub budget: String,
    pub uniform_mean: f64,
    pub budget_mean: f64,
    /// Seeds measured for both, and on how many of them the budget student
    /// was better, equal, worse.
    pub seeds: usize,
    pub budget_wins: usize,
    pub ties: usize,
    pub budget_losses: usize,
}

/// Both curves of a results folder.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetReport {
    pub source: String,
    pub teacher_acc: f64,
    pub teacher_params: usize,
    pub uniform: SizeCurve,
    pub allocated: SizeCurve,
    pub same_size: Vec<SameSize>,
}

/// The comparison of `dir`'s uniform and budget students at fractions
/// `lo` and `hi` of the teacher's top-1; None when it holds no budget
/// student.
pub fn budget_report(dir: &Path, lo: f64, hi: f64) -> Result<Option<BudgetReport>> {
    let records = read_records(dir)?;
    let mut teacher = None;
    // The first record of a job wins, as everywhere (`sweep::jobs::finished`).
    let mut seen: BTreeMap<(Option<usize>, usize, u64), StudentRecord> = BTreeMap::new();
    for r in records {
        match r {
            Record::Teacher(t) => {
                teacher.get_or_insert(t);
            }
            Record::Student(s) => {
                seen.entry((s.budget(), s.rank, s.seed)).or_insert(s);
            }
        }
    }
    if !seen.values().any(|s| s.allocation.is_some()) {
        return Ok(None);
    }
    let Some(teacher) = teacher else {
        bail!(
            "{}: budget students but no teacher record, so no reference accuracy",
            dir.display()
        );
    };
    let (budget, uniform): (Vec<_>, Vec<_>) =
        seen.into_values().partition(|s| s.allocation.is_some());
    let curve = |kind: &str, students: Vec<StudentRecord>| -> Result<SizeCurve> {
        let points = size_points(students);
        let crossings = [lo, hi]
            .iter()
            .map(|&f| param_crossing(&points, f, teacher.top1, teacher.params))
            .collect::<Result<_>>()?;
        Ok(SizeCurve {
            kind: kind.into(),
            points,
            crossings,
        })
    };
    let uniform = curve("uniform", uniform)?;
    let allocated = curve("allocated", budget)?;
    let same_size = same_size(&uniform.points, &allocated.points);
    Ok(Some(BudgetReport {
        source: dir.display().to_string(),
        teacher_acc: teacher.top1,
        teacher_params: teacher.params,
        uniform,
        allocated,
        same_size,
    }))
}

/// One point per parameter count, ascending (students of one count are
/// one size: the seeds of a rank, or of a budget).
fn size_points(students: Vec<StudentRecord>) -> Vec<SizePoint> {
    let mut by_params: BTreeMap<usize, SizePoint> = BTreeMap::new();
    for s in students {
        let p = by_params.entry(s.params).or_insert_with(|| SizePoint {
            params: s.params,
            name: match s.budget() {
                Some(b) => format!("b{b}"),
                None => format!("r{}", s.rank),
            },
            mean: 0.0,
            seeds: Vec::new(),
            ranks: s.ranks.clone(),
        });
        p.seeds.push((s.seed, s.top1));
    }
    let mut points: Vec<SizePoint> = by_params.into_values().collect();
    for p in &mut points {
        p.seeds.sort_by_key(|&(seed, _)| seed);
        p.mean = p.seeds.iter().map(|s| s.1).sum::<f64>() / p.seeds.len() as f64;
    }
    points
}

/// Where the PCHIP curve through `points` (mean top-1 against parameters)
/// first reaches `fraction * reference`.
fn param_crossing(
    points: &[SizePoint],
    fraction: f64,
    reference: f64,
    teacher_params: usize,
) -> Result<ParamCrossing> {
    let level = fraction * reference;
    let pct = 100.0 * fraction;
    let mut c = ParamCrossing {
        fraction,
        level,
        params: None,
        compression: None,
        note: String::new(),
    };
    if points.len() < 2 {
        c.note = format!("{} size(s) measured; a crossing needs two", points.len());
        return Ok(c);
    }
    let x: Vec<f64> = points.iter().map(|p| p.params as f64).collect();
    let y: Vec<f64> = points.iter().map(|p| p.mean).collect();
    let curve = Pchip::new(&x, &y)?;
    c.params = curve.first_reaching(level);
    c.compression = c.params.map(|p| teacher_params as f64 / p);
    c.note = match c.params {
        Some(p) if p <= x[0] => format!("{pct:.0}% of the teacher is already reached by the smallest student ({p:.0} parameters); the true crossing may be lower"),
        Some(p) => format!("{pct:.0}% of the teacher is first reached at {p:.0} parameters ({:.2}x fewer than the teacher)", teacher_params as f64 / p),
        None => format!("never reaches {pct:.0}% of the teacher between {:.0} and {:.0} parameters", x[0], x[x.len() - 1]),
    };
    Ok(c)
}

/// Uniform and budget students of equal parameter count, seed by seed.
fn same_size(uniform: &[SizePoint], budget: &[SizePoint]) -> Vec<SameSize> {
    let mut out = Vec::new();
    for b in budget {
        let Some(u) = uniform.iter().find(|u| u.params == b.params) else {
            continue;
        };
        let (mut wins, mut ties, mut losses) = (0, 0, 0);
        for &(seed, acc) in &b.seeds {
            let Some(&(_, uacc)) = u.seeds.iter().find(|s| s.0 == seed) else {
                continue;
            };
            match acc.partial_cmp(&uacc) {
                Some(std::cmp::Ordering::Greater) => wins += 1,
                Some(std::cmp::Ordering::Less) => losses += 1,
                _ => ties += 1,
            }
        }
        out.push(SameSize {
            params: b.params,
            uniform: u.name.clone(),
            budget: b.name.clone(),
            uniform_mean: u.mean,
            budget_mean: b.mean,
            seeds: wins + ties + losses,
            budget_wins: wins,
            ties,
            budget_losses: losses,
        });
    }
    out
}

impl BudgetReport {
    /// The crossings and the same-size pairs, for the terminal.
    pub fn terminal_summary(&self) -> String {
        let mut s = format!(
            "accuracy against parameters in {} (teacher {:.2}%, {} parameters)\n",
            self.source,
            100.0 * self.teacher_acc,
            self.teacher_params
        );
        for c in [&self.uniform, &self.allocated] {
            // At the smallest size the crossing is an upper bound.
            let smallest = c.points.first().map_or(0.0, |p| p.params as f64);
            let at = |x: &ParamCrossing| match x.params {
                Some(p) if p <= smallest => format!("<= {p:.0}"),
                Some(p) => format!("{p:.0}"),
                None => "-".into(),
            };
            s += &format!(
                "  {:<9} {} sizes; {:.0}% at {} parameters, {:.0}% at {}\n",
                c.kind,
                c.points.len(),
                100.0 * c.crossings[0].fraction,
                at(&c.crossings[0]),
                100.0 * c.crossings[1].fraction,
                at(&c.crossings[1])
            );
        }
        for p in &self.same_size {
            s += &format!(
                "  {} parameters: uniform {} {:.2}%, allocated {} {:.2}% ({:+.2} points; allocated better on {}, equal on {}, worse on {} of {} seeds)\n",
                p.params,
                p.uniform,
                100.0 * p.uniform_mean,
                p.budget,
                100.0 * p.budget_mean,
                100.0 * (p.budget_mean - p.uniform_mean),
                p.budget_wins,
                p.ties,
                p.budget_losses,
                p.seeds
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(params: usize, accs: &[f64]) -> SizePoint {
        SizePoint {
            params,
            name: format!("p{params}"),
            mean: accs.iter().sum::<f64>() / accs.len() as f64,
            seeds: accs
                .iter()
                .enumerate()
                .map(|(i, &a)| (i as u64, a))
                .collect(),
            ranks: None,
        }
    }

    #[test]
    fn crossings_on_the_parameter_axis_follow_the_curve() {
        // Linear between knots (PCHIP of collinear points is the line).
        let pts = vec![point(100, &[0.5]), point(200, &[0.7]), point(300, &[0.9])];
        let c = param_crossing(&pts, 0.6, 1.0, 1000).unwrap();
        assert!((c.params.unwrap() - 150.0).abs() < 1e-6, "{c:?}");
        assert!((c.compression.unwrap() - 1000.0 / 150.0).abs() < 1e-6);
        assert!(param_crossing(&pts, 0.95, 1.0, 1000)
            .unwrap()
            .params
            .is_none());
        let low = param_crossing(&pts, 0.4, 1.0, 1000).unwrap();
        assert_eq!(low.params, Some(100.0));
        assert!(low.note.contains("already reached"), "{}", low.note);
        let one = param_crossing(&pts[..1], 0.4, 1.0, 1000).unwrap();
        assert!(one.params.is_none() && one.note.contains("needs two"));
    }

    #[test]
    fn same_size_students_are_compared_seed_by_seed() {
        let u = vec![point(100, &[0.5, 0.6, 0.7]), point(200, &[0.8, 0.8, 0.8])];
        let b = vec![point(100, &[0.6, 0.6, 0.6]), point(150, &[0.9])];
        let s = same_size(&u, &b);
        assert_eq!(s.len(), 1, "the budget of 150 has no uniform twin");
        let p = &s[0];
        assert_eq!(
            (p.seeds, p.budget_wins, p.ties, p.budget_losses),
            (3, 1, 1, 1)
        );
    }
}
