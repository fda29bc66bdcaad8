//! Per-layer ranks for a parameter budget (`factorize --budget`).
//!
//! Input: one curve per factorizable layer, the predicted loss increase
//! Δ_l(r) of the model when that layer alone is factorized at rank r
//! (measured by `analysis::sensitivity`: the KD loss against the teacher,
//! whose own KD loss is 0). The model's predicted increase is taken to be
//! additive over layers, Σ_l Δ_l(r_l), and the allocation minimizes it
//! subject to the total parameter count ≤ the budget and
//! floor ≤ r_l ≤ ceiling.
//!
//! Between measured ranks Δ_l is the lower convex hull of the measured
//! points, read linearly: a curve measured at ranks 1, 2, 4, ... gives
//! every integer rank a value, and measurement noise that would make the
//! curve non-convex is smoothed away (the hull is the tightest convex curve
//! under the points).
//!
//! The method is greedy marginal gain: every layer starts at its floor, and
//! each step raises by one the rank of the layer whose next step buys the
//! largest loss decrease per parameter, Δ_l(r) − Δ_l(r+1) over the step's
//! cost `out + in`, among the steps that still fit the budget; it stops when
//! no step with a positive gain fits. On convex curves this is the
//! Lagrangian relaxation solved exactly: at every moment the allocation
//! minimizes Σ Δ_l(r_l) + λ · params for the λ of the last step's gain per
//! parameter, so it lies on the lower convex frontier of (params, loss).
//! Greedy is preferred to a search over λ because it reaches integer ranks
//! directly, spends the budget to the last step that fits, and floors and
//! ceilings are simply where a layer starts and stops. When every step
//! costs the same number of parameters (layers of one shape) it is the
//! exact integer optimum (the classic result for separable convex resource
//! allocation; a test checks it against brute force); with steps of
//! different costs (attention 2·width, MLP width + mlp) the budget's last
//! few steps may be packed less well than the integer optimum, by at most
//! one step's gain per layer. Ties (equal gain per parameter, within
//! rounding) go to the layer of lowest rank, then to the first in block
//! order, so curves that cost every layer the same loss per parameter give
//! the uniform rank.

use crate::model::params::{param_count, validate_ranks, BlockLinear, BlockRanks, Ranks};
use crate::model::VitConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A parameter budget: a total count or a compression factor of the dense
/// model (`--budget 120000` or `--budget 4x`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Budget {
    /// The student's total parameter count (every tensor, head included).
    Params(usize),
    /// The dense model's parameter count divided by this factor.
    Compression(f64),
}

impl FromStr for Budget {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        let t = text.trim();
        if let Some(x) = t.strip_suffix('x') {
            let f: f64 = x
                .parse()
                .with_context(|| format!("budget '{text}': '{x}' is not a number"))?;
            if !f.is_finite() || f < 1.0 {
                bail!("budget '{text}': a compression factor must be at least 1");
            }
            return Ok(Budget::Compression(f));
        }
        let n: usize = t.parse().with_context(|| {
            format!("budget '{text}': give a parameter count (120000) or a compression factor (4x)")
        })?;
        if n == 0 {
            bail!("budget '{text}': a parameter count must be positive");
        }
        Ok(Budget::Params(n))
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Params(n) => write!(f, "{n}"),
            Budget::Compression(x) => write!(f, "{x}x"),
        }
    }
}

impl Budget {
    /// The parameter count this budget allows a student of `cfg`.
    pub fn params(&self, cfg: &VitConfig) -> usize {
        match *self {
            Budget::Params(n) => n,
            Budget::Compression(x) => {
                (param_count(cfg, &crate::model::params::dense_ranks(cfg)) as f64 / x).floor()
                    as usize
            }
        }
    }
}

/// The smallest and largest rank the allocation may give a layer (the
/// ceiling is cut to each layer's min(out, in); None: that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankBounds {
    pub floor: usize,
    pub ceiling: Option<usize>,
}

impl Default for RankBounds {
    fn default() -> Self {
        RankBounds {
            floor: 1,
            ceiling: None,
        }
    }
}

/// One layer's measured loss increase against its rank.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerLoss {
    pub block: usize,
    pub layer: BlockLinear,
    /// (rank, predicted loss increase), any order.
    pub points: Vec<(usize, f64)>,
}

/// The ranks chosen for a budget and what they are predicted to cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    #[serde(skip)]
    pub ranks: Ranks,
    /// The student's total parameter count.
    pub params: usize,
    /// The budget it had to meet.
    pub budget: usize,
    /// Σ_l Δ_l(r_l), the additive prediction.
    pub predicted_increase: f64,
}

/// What chose a budget student's ranks, as its file records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationRecord {
    /// The budget as given (a count or a compression factor).
    pub budget: Budget,
    /// The parameter count it allowed, and the student's.
    pub budget_params: usize,
    pub params: usize,
    pub bounds: RankBounds,
    /// The sensitivity pass's `analysis.json` the curves came from.
    pub sensitivity: crate::provenance::FileRef,
    /// Σ_l Δ_l(r_l), the additive prediction of the KD loss increase.
    pub predicted_increase: f64,
}

/// A student chosen for a budget: its per-layer ranks and how they were
/// chosen (what `factorize --budget` writes and a budget sweep trains).
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetStudent {
    pub ranks: Ranks,
    pub allocation: AllocationRecord,
}

/// The student of `budget` for a teacher of `cfg`: the sensitivity pass
/// `report` (read from `file`, its `analysis.json`) gives each layer's
/// curve, and only the layers `targets` factorizes (`Some` there) are
/// allocated; the others stay dense.
pub fn allocate_from_sensitivity(
    cfg: &VitConfig,
    report: &crate::analysis::sensitivity::SensitivityReport,
    file: &std::path::Path,
    targets: &Ranks,
    budget: Budget,
    bounds: RankBounds,
) -> Result<BudgetStudent> {
    for l in &report.layers {
        let lin = l.linear()?;
        if l.block >= cfg.depth || lin.shape(cfg) != (l.out, l.inp) {
            bail!("{}: layer blocks.{}.{} [{}, {}] was measured on another model than this teacher ({} blocks, its {} is {:?})", file.display(), l.block, lin.name(), l.out, l.inp, cfg.depth, lin.name(), lin.shape(cfg));
        }
    }
    let curves: Vec<_> = report
        .loss_curves()?
        .into_iter()
        .filter(|c| targets[c.block][c.layer].is_some())
        .collect();
    let budget_params = budget.params(cfg);
    let a = allocate(cfg, &curves, budget_params, bounds).with_context(|| {
        format!("allocating ranks for budget {budget} ({budget_params} parameters)")
    })?;
    Ok(BudgetStudent {
        ranks: a.ranks,
        allocation: AllocationRecord {
            budget,
            budget_params,
            params: a.params,
            bounds,
            sensitivity: crate::provenance::FileRef::of(file)?,
            predicted_increase: a.predicted_increase,
        },
    })
}

/// A layer in the allocation: its step cost, bounds and convex curve.
struct Slot {
    block: usize,
    layer: BlockLinear,
    step: usize,
    rank: usize,
    ceiling: usize,
    hull: Vec<(f64, f64)>,
}

impl Slot {
    fn loss(&self, r: usize) -> f64 {
        hull_value(&self.hull, r as f64)
    }
    /// Loss decrease per parameter of the next step (None at the ceiling).
    fn next_gain(&self) -> Option<f64> {
        (self.rank < self.ceiling)
            .then(|| (self.loss(self.rank) - self.loss(self.rank + 1)) / self.step as f64)
    }
}

/// Choose a rank per layer of `curves` (the others stay dense) for a
/// student of `cfg` with at most `budget` parameters.
pub fn allocate(
    cfg: &VitConfig,
    curves: &[LayerLoss],
    budget: usize,
    bounds: RankBounds,
) -> Result<Allocation> {
    if bounds.floor == 0 {
        bail!("the rank floor must be at least 1");
    }
    if let Some(c) = bounds.ceiling.filter(|&c| c < bounds.floor) {
        bail!("the rank ceiling {c} is below the floor {}", bounds.floor);
    }
    let mut slots = Vec::with_capacity(curves.len());
    let mut ranks: Ranks = crate::model::params::dense_ranks(cfg);
    for c in curves {
        let name = format!("blocks.{}.{}", c.block, c.layer.name());
        if c.block >= cfg.depth {
            bail!("curve of {name}: the model has {} blocks", cfg.depth);
        }
        if ranks[c.block][c.layer].is_some() {
            bail!("two curves for layer {name}");
        }
        let (out, inp) = c.layer.shape(cfg);
        let ceiling = bounds.ceiling.unwrap_or(usize::MAX).min(out.min(inp));
        if bounds.floor > ceiling {
            bail!(
                "the rank floor {} is above layer {name}'s largest rank {ceiling}",
                bounds.floor
            );
        }
        let hull = lower_hull(&c.points, &name)?;
        let (lo, hi) = (hull[0].0 as usize, hull[hull.len() - 1].0 as usize);
        if lo > bounds.floor || hi < ceiling {
            bail!("the curve of layer {name} covers ranks {lo}..={hi}, the allocation needs {}..={ceiling}: measure those ranks or give a floor and ceiling inside them", bounds.floor);
        }
        ranks[c.block][c.layer] = Some(bounds.floor);
        slots.push(Slot {
            block: c.block,
            layer: c.layer,
            step: out + inp,
            rank: bounds.floor,
            ceiling,
            hull,
        });
    }
    if slots.is_empty() {
        bail!("no layer curves to allocate ranks from");
    }
    let least = param_count(cfg, &ranks);
    if least > budget {
        bail!("a budget of {budget} parameters is below the smallest student, {least} parameters with every layer at the floor rank {}", bounds.floor);
    }
    let spent = greedy(&mut slots, budget - least);
    for s in &slots {
        ranks[s.block][s.layer] = Some(s.rank);
    }
    validate_ranks(cfg, &ranks)?;
    let params = param_count(cfg, &ranks);
    debug_assert_eq!(params, least + spent);
    Ok(Allocation {
        ranks,
        params,
        budget,
        predicted_increase: slots.iter().map(|s| s.loss(s.rank)).sum(),
    })
}

/// Raise ranks one step at a time, the best gain per parameter first, while
/// steps fit in `room` parameters; returns the parameters spent.
fn greedy(slots: &mut [Slot], mut room: usize) -> usize {
    let mut spent = 0;
    let mut open: Vec<bool> = vec![true; slots.len()];
    loop {
        let mut best: Option<(usize, f64)> = None;
        for (i, s) in slots.iter().enumerate() {
            if !open[i] {
                continue;
            }
            let Some(gain) = s.next_gain().filter(|&g| g > 0.0) else {
                open[i] = false;
                continue;
            };
            if s.step > room {
                // Its later steps cost the same and gain no more.
                open[i] = false;
                continue;
            }
            best = match best {
                Some((j, g)) if !better(gain, s.rank, g, slots[j].rank) => Some((j, g)),
                _ => Some((i, gain)),
            };
        }
        let Some((i, _)) = best else { return spent };
        slots[i].rank += 1;
        room -= slots[i].step;
        spent += slots[i].step;
    }
}

/// Whether a step of gain `g` at rank `r` beats one of gain `h` at rank
/// `q`: a larger gain per parameter, or (within rounding) a lower rank.
/// Slots are scanned in block order, so a full tie keeps the first.
fn better(g: f64, r: usize, h: f64, q: usize) -> bool {
    let tolerance = 1e-9 * g.abs().max(h.abs());
    if (g - h).abs() <= tolerance {
        r < q
    } else {
        g > h
    }
}

/// The lower convex hull of `points` (rank, loss), sorted by rank.
fn lower_hull(points: &[(usize, f64)], name: &str) -> Result<Vec<(f64, f64)>> {
    let mut p: Vec<(f64, f64)> = points.iter().map(|&(r, l)| (r as f64, l)).collect();
    if let Some(&(r, l)) = points.iter().find(|(r, l)| *r == 0 || !l.is_finite()) {
        bail!("curve of layer {name}: point (rank {r}, loss {l}) needs a rank of at least 1 and a finite loss");
    }
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Some(w) = p.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("curve of layer {name}: rank {} measured twice", w[0].0);
    }
    if p.is_empty() {
        bail!("curve of layer {name} has no points");
    }
    let mut hull: Vec<(f64, f64)> = Vec::with_capacity(p.len());
    for q in p {
        while hull.len() >= 2 {
            let (a, b) = (hull[hull.len() - 2], hull[hull.len() - 1]);
            // Drop b when it lies on or above the segment a-q.
            let cross = (b.0 - a.0) * (q.1 - a.1) - (b.1 - a.1) * (q.0 - a.0);
            if cross <= 0.0 {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(q);
    }
    Ok(hull)
}

/// The hull read linearly at `x` (inside its ranks).
fn hull_value(hull: &[(f64, f64)], x: f64) -> f64 {
    let i = hull
        .partition_point(|p| p.0 <= x)
        .clamp(1, hull.len().max(2) - 1);
    if hull.len() == 1 {
        return hull[0].1;
    }
    let ((x0, y0), (x1, y1)) = (hull[i - 1], hull[i]);
    if x == x1 {
        return y1;
    }
    y0 + (y1 - y0) * (x - x0) / (x1 - x0)
}

/// The per-layer ranks as a table: one row per block, one column per
/// projection (`-` for a dense layer).
pub fn ranks_table(ranks: &Ranks) -> String {
    let mut text = format!("{:<6}", "block");
    for l in BlockLinear::ALL {
        text += &format!(" {:>5}", l.short());
    }
    text.push('\n');
    for (i, b) in ranks.iter().enumerate() {
        text += &format!("{i:<6}");
        for r in BlockRanks::values(b) {
            text += &format!(" {:>5}", r.map_or("-".to_string(), |r| r.to_string()));
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::uniform_ranks;

    fn square_cfg(depth: usize, width: usize) -> VitConfig {
        let mut cfg = VitConfig::preset("vit-demo", 10).unwrap();
        cfg.depth = depth;
        cfg.width = width;
        cfg.mlp = width;
        cfg.heads = 1;
        cfg
    }

    /// Curves Δ(r) = scale · f(r) at every rank 1..=max.
    fn curve(block: usize, layer: BlockLinear, max: usize, f: impl Fn(usize) -> f64) -> LayerLoss {
        LayerLoss {
            block,
            layer,
            points: (1..=max).map(|r| (r, f(r))).collect(),
        }
    }

    #[test]
    fn budgets_parse_as_counts_or_factors() {
        assert_eq!("1200".parse::<Budget>().unwrap(), Budget::Params(1200));
        assert_eq!("4x".parse::<Budget>().unwrap(), Budget::Compression(4.0));
        assert_eq!("2.5x".parse::<Budget>().unwrap().to_string(), "2.5x");
        for bad in ["0", "0.5x", "x", "ten", "-3", "nanx"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad}");
        }
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let dense = param_count(&cfg, &crate::model::params::dense_ranks(&cfg));
        assert_eq!(Budget::Compression(2.0).params(&cfg), dense / 2);
    }

    #[test]
    fn the_hull_is_convex_under_the_points_and_reads_linearly() {
        let h = lower_hull(&[(4, 1.0), (1, 8.0), (2, 6.0), (8, 0.0)], "x").unwrap();
        // (2, 6) lies above the segment (1, 8)-(4, 1): dropped.
        assert_eq!(h, vec![(1.0, 8.0), (4.0, 1.0), (8.0, 0.0)]);
        assert_eq!(hull_value(&h, 1.0), 8.0);
        assert!((hull_value(&h, 2.0) - (8.0 - 7.0 / 3.0)).abs() < 1e-12);
        assert_eq!(hull_value(&h, 6.0), 0.5);
        assert_eq!(hull_value(&h, 8.0), 0.0);
        assert!(lower_hull(&[(1, 1.0), (1, 2.0)], "x").is_err());
        assert!(lower_hull(&[(0, 1.0)], "x").is_err());
        assert!(lower_hull(&[(1, f64::NAN)], "x").is_err());
    }

    /// Every layer of one shape, convex curves: the greedy allocation's
    /// predicted loss equals the best over every rank combination that
    /// meets the budget.
    #[test]
    fn with_equal_step_costs_greedy_equals_brute_force() {
        let cfg = square_cfg(1, 4);
        let layers = [BlockLinear::Q, BlockLinear::K, BlockLinear::Fc1];
        let mut rng = crate::rng::Rng::new(3);
        for trial in 0..20 {
            // Convex and decreasing: gains sorted descending, cumulated.
            let curves: Vec<LayerLoss> = layers
                .iter()
                .map(|&l| {
                    let mut gains: Vec<f64> = (0..3).map(|_| rng.uniform()).collect();
                    gains.sort_by(|a, b| b.total_cmp(a));
                    let mut loss = vec![gains.iter().sum::<f64>()];
                    for g in &gains {
                        loss.push(loss.last().unwrap() - g);
                    }
                    curve(0, l, 4, |r| loss[r - 1])
                })
                .collect();
            let bounds = RankBounds::default();
            let least = param_count(&cfg, &at(&cfg, &layers, [1, 1, 1]));
            for extra in 0..=10 {
                let budget = least + extra * 4;
                let got = allocate(&cfg, &curves, budget, bounds).unwrap();
                let mut best = f64::INFINITY;
                for a in 1..=4 {
                    for b in 1..=4 {
                        for c in 1..=4 {
                            if param_count(&cfg, &at(&cfg, &layers, [a, b, c])) <= budget {
                                let loss = curves[0].points[a - 1].1
                                    + curves[1].points[b - 1].1
                                    + curves[2].points[c - 1].1;
                                best = best.min(loss);
                            }
                        }
                    }
                }
                assert!(got.params <= budget);
                assert!(
                    (got.predicted_increase - best).abs() < 1e-12,
                    "trial {trial}, budget {budget}: greedy {} brute force {best}",
                    got.predicted_increase
                );
            }
        }
    }

    fn at(cfg: &VitConfig, layers: &[BlockLinear], r: [usize; 3]) -> Ranks {
        let mut ranks = crate::model::params::dense_ranks(cfg);
        for (l, r) in layers.iter().zip(r) {
            ranks[0][*l] = Some(r);
        }
        ranks
    }

    fn every_layer(cfg: &VitConfig, f: impl Fn(BlockLinear, usize) -> f64) -> Vec<LayerLoss> {
        (0..cfg.depth)
            .flat_map(|b| {
                BlockLinear::ALL.map(|l| {
                    let (o, i) = l.shape(cfg);
                    curve(b, l, o.min(i), |r| f(l, r))
                })
            })
            .collect()
    }

    /// A loss per parameter the same for every layer gives the uniform rank
    /// at the uniform rank's parameter count.
    #[test]
    fn curves_equal_per_parameter_give_the_uniform_rank() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let curves = every_layer(&cfg, |l, r| {
            let (o, i) = l.shape(&cfg);
            (o + i) as f64 * 0.5f64.powi(r as i32)
        });
        for r in [1, 2, 4, 8, 16] {
            let budget = param_count(&cfg, &uniform_ranks(&cfg, r));
            let got = allocate(&cfg, &curves, budget, RankBounds::default()).unwrap();
            assert_eq!(got.ranks, uniform_ranks(&cfg, r), "rank {r}");
            assert_eq!(got.params, budget);
        }
    }

    #[test]
    fn the_budget_floors_and_ceilings_hold() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        // The MLP loses much more than attention: it takes the ranks.
        let curves = every_layer(&cfg, |l, r| {
            let scale = if matches!(l, BlockLinear::Fc1 | BlockLinear::Fc2) {
                100.0
            } else {
                1.0
            };
            scale / r as f64
        });
        let bounds = RankBounds {
            floor: 2,
            ceiling: Some(12),
        };
        let budget = param_count(&cfg, &uniform_ranks(&cfg, 6));
        let got = allocate(&cfg, &curves, budget, bounds).unwrap();
        assert!(got.params <= budget && budget - got.params < cfg.width + cfg.mlp);
        assert_eq!(got.params, param_count(&cfg, &got.ranks));
        let all: Vec<usize> = got
            .ranks
            .iter()
            .flat_map(|b| b.values().flatten())
            .copied()
            .collect();
        assert_eq!(all.len(), 6 * cfg.depth);
        assert!(all.iter().all(|&r| (2..=12).contains(&r)), "{all:?}");
        assert_eq!(got.ranks[0][BlockLinear::Fc1], Some(12));
        assert!(got.ranks[0][BlockLinear::Q].unwrap() < 12);
        // Too small a budget, bad bounds, missing ranks: errors naming them.
        let e = allocate(&cfg, &curves, 1000, bounds)
            .unwrap_err()
            .to_string();
        assert!(e.contains("below the smallest student"), "{e}");
        let e = allocate(
            &cfg,
            &curves,
            budget,
            RankBounds {
                floor: 3,
                ceiling: Some(2),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("ceiling 2 is below the floor 3"), "{e}");
        let short = vec![curve(0, BlockLinear::Q, 4, |r| 1.0 / r as f64)];
        let e = allocate(&cfg, &short, budget, RankBounds::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks.0.attn.q") && e.contains("covers ranks 1..=4"),
            "{e}"
        );
    }

    #[test]
    fn a_budget_students_count_equals_its_hand_count() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let curves = every_layer(&cfg, |l, r| (l as usize + 1) as f64 / r as f64);
        let got = allocate(&cfg, &curves, 60_000, RankBounds::default()).unwrap();
        let (w, m, c, p) = (cfg.width, cfg.mlp, cfg.classes, cfg.patch);
        let tokens = (cfg.image_size / p).pow(2) + 1;
        let mut count = w * cfg.channels * p * p + w + w + tokens * w + 2 * w + c * w + c;
        for b in &got.ranks {
            count += 4 * w; // the two LayerNorms
            for (l, r) in b.iter() {
                let (o, i) = l.shape(&cfg);
                count += r.unwrap() * (o + i) + o;
            }
        }
        assert_eq!((w, m), (cfg.width, cfg.mlp));
        assert_eq!(got.params, count);
        assert!(count <= 60_000);
    }
}
