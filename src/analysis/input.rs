//! Reading the measured points: a sweep's results folder (every
//! `results*.jsonl`, parsed by `crate::results`), one results `.jsonl` file, or
//! a CSV `rank,accuracy[,seed][,params]`.
//!
//! Rules: a repeated (rank, seed) in results files keeps the first record
//! (two shards given the same work); the first teacher record wins. In a CSV
//! a repeated rank without a seed column, or a repeated (rank, seed), is an
//! error naming both lines. Points may come in any order; they are sorted by
//! rank. Ranks must be positive integers and accuracies finite.

use crate::results::{read_records, read_records_file, Record};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// One trained student's accuracy.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    pub rank: usize,
    pub seed: u64,
    pub acc: f64,
    pub params: Option<usize>,
}

/// Everything read from the input.
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    /// Sorted by (rank, seed), one per (rank, seed).
    pub points: Vec<Measurement>,
    pub teacher_acc: Option<f64>,
    pub teacher_params: Option<usize>,
    /// What was read (for the report).
    pub source: String,
}

impl Measurements {
    /// The distinct seeds, ascending.
    pub fn seeds(&self) -> Vec<u64> {
        let mut s: Vec<u64> = self.points.iter().map(|m| m.seed).collect();
        s.sort();
        s.dedup();
        s
    }

    /// (rank, accuracy) of one seed, ascending rank.
    pub fn seed_curve(&self, seed: u64) -> Vec<(f64, f64)> {
        self.points
            .iter()
            .filter(|m| m.seed == seed)
            .map(|m| (m.rank as f64, m.acc))
            .collect()
    }

    /// (rank, mean accuracy over the seeds measured at that rank), ascending rank.
    pub fn mean_curve(&self) -> Vec<(f64, f64)> {
        let mut by_rank: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
        for m in &self.points {
            let e = by_rank.entry(m.rank).or_insert((0.0, 0));
            e.0 += m.acc;
            e.1 += 1;
        }
        by_rank
            .into_iter()
            .map(|(r, (sum, n))| (r as f64, sum / n as f64))
            .collect()
    }
}

/// Read a results folder, a results `.jsonl` file or a `.csv` file.
pub fn read_measurements(path: &Path) -> Result<Measurements> {
    let m = if path.is_dir() {
        from_records(read_records(path)?, path)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        read_csv(path)?
    } else if path.is_file() {
        from_records(read_records_file(path)?, path)
    } else {
        bail!("{}: no such results folder or file", path.display());
    };
    check(&m, path)?;
    Ok(m)
}

fn from_records(records: Vec<Record>, path: &Path) -> Measurements {
    let mut out = Measurements {
        source: path.display().to_string(),
        ..Default::default()
    };
    let mut seen = BTreeMap::new();
    for r in records {
        match r {
            // Budget students have per-layer ranks, no point on the rank
            // axis (`analysis::budget` reads them).
            Record::Student(s) if s.allocation.is_some() => {}
            Record::Student(s) => {
                seen.entry((s.rank, s.seed)).or_insert(Measurement {
                    rank: s.rank,
                    seed: s.seed,
                    acc: s.top1,
                    params: Some(s.params),
                });
                out.teacher_params.get_or_insert(s.teacher_params);
            }
            Record::Teacher(t) => {
                if out.teacher_acc.is_none() {
                    out.teacher_acc = Some(t.top1);
                    out.teacher_params = Some(t.params);
                }
            }
        }
    }
    out.points = seen.into_values().collect();
    out
}

/// The CSV columns, by position in the header (or the default order).
struct Columns {
    rank: usize,
    acc: usize,
    seed: Option<usize>,
    params: Option<usize>,
}

fn columns(header: &[&str], path: &Path) -> Result<Columns> {
    let find = |names: &[&str]| {
        header
            .iter()
            .position(|h| names.contains(&h.to_ascii_lowercase().as_str()))
    };
    let rank = find(&["rank", "r"])
        .with_context(|| format!("{} line 1: header has no 'rank' column", path.display()))?;
    let acc = find(&["accuracy", "acc", "top1"])
        .with_context(|| format!("{} line 1: header has no 'accuracy' column", path.display()))?;
    Ok(Columns {
        rank,
        acc,
        seed: find(&["seed"]),
        params: find(&["params"]),
    })
}

fn read_csv(path: &Path) -> Result<Measurements> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Measurements {
        source: path.display().to_string(),
        ..Default::default()
    };
    let mut cols: Option<Columns> = None;
    let mut lines_of: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if cols.is_none() && fields[0].parse::<f64>().is_err() {
            cols = Some(columns(&fields, path)?);
            continue;
        }
        let c = cols.get_or_insert(Columns {
            rank: 0,
            acc: 1,
            seed: (fields.len() > 2).then_some(2),
            params: (fields.len() > 3).then_some(3),
        });
        let m = csv_row(&fields, c)
            .with_context(|| format!("{} line {n}: '{line}'", path.display()))?;
        let has_seed = c.seed.is_some();
        if let Some(first) = lines_of.insert((m.rank, m.seed), n) {
            if has_seed {
                bail!(
                    "{} line {n}: rank {} seed {} is already on line {first}",
                    path.display(),
                    m.rank,
                    m.seed
                );
            }
            bail!("{} line {n}: rank {} is already on line {first}; give a seed column (rank,accuracy,seed) for repeated ranks", path.display(), m.rank);
        }
        out.points.push(m);
    }
    out.points.sort_by_key(|m| (m.rank, m.seed));
    Ok(out)
}

fn csv_row(fields: &[&str], c: &Columns) -> Result<Measurement> {
    let get = |i: usize, what: &str| {
        fields
            .get(i)
            .copied()
            .with_context(|| format!("missing the {what} column"))
    };
    let rank_text = get(c.rank, "rank")?;
    let rank: i64 = rank_text
        .parse()
        .with_context(|| format!("rank '{rank_text}' is not an integer"))?;
    if rank <= 0 {
        bail!("rank {rank} must be positive");
    }
    let acc_text = get(c.acc, "accuracy")?;
    let acc: f64 = acc_text
        .parse()
        .with_context(|| format!("accuracy '{acc_text}' is not a number"))?;
    if !acc.is_finite() {
        bail!("accuracy '{acc_text}' is not a finite number");
    }
    let seed = match c.seed {
        Some(i) => get(i, "seed")?
            .parse()
            .with_context(|| format!("seed '{}' is not a non-negative integer", fields[i]))?,
        None => 0,
    };
    let params =
        match c.params {
            Some(i) => Some(get(i, "params")?.parse().with_context(|| {
                format!("params '{}' is not a non-negative integer", fields[i])
            })?),
            None => None,
        };
    Ok(Measurement {
        rank: rank as usize,
        seed,
        acc,
        params,
    })
}

/// Finite accuracies, positive ranks and at least two distinct ranks.
fn check(m: &Measurements, path: &Path) -> Result<()> {
    if let Some(p) = m.points.iter().find(|p| !p.acc.is_finite()) {
        bail!(
            "{}: rank {} seed {} has accuracy {}, which is not a finite number",
            path.display(),
            p.rank,
            p.seed,
            p.acc
        );
    }
    if let Some(p) = m.points.iter().find(|p| p.rank == 0) {
        bail!(
            "{}: rank 0 (seed {}) is not a valid rank",
            path.display(),
            p.seed
        );
    }
    if let Some(t) = m.teacher_acc.filter(|t| !t.is_finite() || *t <= 0.0) {
        bail!(
            "{}: the teacher accuracy {t} is not a positive number",
            path.display()
        );
    }
    let ranks = m.mean_curve().len();
    if ranks < 2 {
        bail!(
            "{}: {} distinct rank(s) measured; the analysis needs at least two",
            path.display(),
            ranks
        );
    }
    Ok(())
}
