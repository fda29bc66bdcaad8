//! Which ranks to train next in an adaptive sweep: the ones that most narrow
//! r_lo, r_hi and the knee, instead of a fixed grid.
//!
//! A threshold is bracketed by the measured ranks a < b where the measured
//! accuracy first reaches the level (acc(a) < level <= acc(b)). It is pinned
//! when b - a <= 2: every integer crossing in (a, b] is then within one rank
//! of the estimate. For an unpinned threshold the candidates are c - 1 and c,
//! where c is the PCHIP curve's integer crossing inside the bracket (clamped
//! strictly inside it): if the curve is right, those two pin it at once;
//! if not, the bracket still shrinks. A threshold first reached at the
//! smallest measured rank asks for half that rank; one never reached asks
//! for twice the largest. The knee asks for its own rank until a measured
//! rank lies within one of it. Candidates are taken round-robin over the
//! targets (r_lo, r_hi, knee), skipping measured ranks, up to n.

use super::knee::knee;
use super::pchip::Pchip;
use super::{reference_acc, AnalysisOptions};

/// Up to `n` ranks in [min_rank, max_rank], not among `points`, that most
/// narrow r_lo, r_hi and the knee. Empty when both thresholds are pinned to
/// ±1 rank (or cannot be narrowed inside [min_rank, max_rank]) and the knee
/// lies within one rank of a measurement. `points` are (rank, accuracy), in
/// any order; `teacher_acc` is the reference when `opts.reference` is Teacher.
pub fn suggest_ranks(
    points: &[(f64, f64)],
    teacher_acc: f64,
    opts: &AnalysisOptions,
    n: usize,
    min_rank: usize,
    max_rank: usize,
) -> Vec<usize> {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite() && p.0 >= 1.0)
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.dedup_by(|a, b| a.0 == b.0);
    let measured: Vec<usize> = pts.iter().map(|p| p.0 as usize).collect();
    let targets = if pts.len() < 2 {
        vec![vec![min_rank, max_rank]]
    } else {
        targets(&pts, teacher_acc, opts, min_rank, max_rank)
    };
    round_robin(&targets, &measured, n, min_rank, max_rank)
}

/// Candidate lists, one per unpinned target, best candidate first.
fn targets(
    pts: &[(f64, f64)],
    teacher_acc: f64,
    opts: &AnalysisOptions,
    min_rank: usize,
    max_rank: usize,
) -> Vec<Vec<usize>> {
    let x: Vec<f64> = pts.iter().map(|p| p.0).collect();
    let y: Vec<f64> = pts.iter().map(|p| p.1).collect();
    let Ok(p) = Pchip::new(&x, &y) else {
        return Vec::new();
    };
    let Ok(reference) = reference_acc(&p, Some(teacher_acc), opts.reference) else {
        return Vec::new();
    };
    let mut out: Vec<Vec<usize>> = [opts.lo, opts.hi]
        .iter()
        .filter_map(|f| threshold_candidates(&p, pts, f * reference, min_rank, max_rank))
        .collect();
    if let Some(k) = knee(&p, opts.knee_axis) {
        if !pts.iter().any(|q| (q.0 - k.rank as f64).abs() <= 1.0) {
            out.push(vec![k.rank]);
        }
    }
    out
}

/// Candidates that narrow one threshold's bracket; None when pinned.
fn threshold_candidates(
    p: &Pchip,
    pts: &[(f64, f64)],
    level: f64,
    min_rank: usize,
    max_rank: usize,
) -> Option<Vec<usize>> {
    let rank = |i: usize| pts[i].0 as usize;
    match pts.iter().position(|q| q.1 >= level) {
        None => {
            let last = rank(pts.len() - 1);
            (last < max_rank).then(|| vec![(2 * last).min(max_rank)])
        }
        Some(0) => {
            let first = rank(0);
            (first > min_rank).then(|| vec![(first / 2).max(min_rank)])
        }
        Some(j) => {
            let (a, b) = (rank(j - 1), rank(j));
            if b - a <= 2 {
                return None;
            }
            let c = (a + 1..=b)
                .find(|&k| p.value(k as f64) >= level)
                .unwrap_or(b);
            let c = c.clamp(a + 2, b - 1);
            Some(vec![c, c - 1])
        }
    }
}

/// First candidates of every target, then second ones, ...; new ranks only.
fn round_robin(
    targets: &[Vec<usize>],
    measured: &[usize],
    n: usize,
    min_rank: usize,
    max_rank: usize,
) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let depth = targets.iter().map(Vec::len).max().unwrap_or(0);
    for d in 0..depth {
        for t in targets {
            if let Some(&r) = t.get(d) {
                if out.len() < n
                    && (min_rank..=max_rank).contains(&r)
                    && !measured.contains(&r)
                    && !out.contains(&r)
                {
                    out.push(r);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_region_and_measured_knee_suggest_nothing() {
        let pts: Vec<(f64, f64)> = [
            (1.0, 0.1),
            (2.0, 0.5),
            (3.0, 0.84),
            (4.0, 0.86),
            (5.0, 0.94),
            (6.0, 0.96),
            (8.0, 0.97),
        ]
        .to_vec();
        assert!(suggest_ranks(&pts, 1.0, &AnalysisOptions::default(), 4, 1, 8).is_empty());
    }

    #[test]
    fn wide_bracket_suggests_ranks_inside_it() {
        let pts = [(2.0, 0.2), (32.0, 0.9), (256.0, 0.99)];
        let s = suggest_ranks(&pts, 1.0, &AnalysisOptions::default(), 4, 1, 256);
        assert!(!s.is_empty());
        assert!(s.iter().all(|r| ![2, 32, 256].contains(r)));
        assert!(s.iter().any(|&r| r > 2 && r < 32), "{s:?}");
    }
}
