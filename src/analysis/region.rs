//! The effective-rank region: where the PCHIP curve first reaches a
//! fraction of the reference accuracy, as an integer rank and as the exact
//! real crossing.

use super::pchip::Pchip;
use serde::Serialize;

/// Where the curve first reaches `fraction` x reference.
#[derive(Clone, Debug, Serialize)]
pub struct Crossing {
    /// The threshold as a fraction of the reference (0.85, 0.95).
    pub fraction: f64,
    /// The accuracy level: fraction x reference.
    pub level: f64,
    /// Smallest integer rank in the measured range whose curve value reaches the level.
    pub rank: Option<usize>,
    /// Smallest real rank in the measured range where the curve reaches the level.
    pub exact: Option<f64>,
    /// A plain statement of the result.
    pub note: String,
}

/// The integer ranks of the measured range: ceil(first knot) ..= floor(last knot).
pub fn integer_ranks(p: &Pchip) -> std::ops::RangeInclusive<usize> {
    (p.x_min().ceil() as usize)..=(p.x_max().floor() as usize)
}

/// Where `p` first reaches `fraction * reference`.
pub fn crossing(p: &Pchip, fraction: f64, reference: f64) -> Crossing {
    let level = fraction * reference;
    let rank = integer_ranks(p).find(|&r| p.value(r as f64) >= level);
    let exact = p.first_reaching(level);
    let pct = 100.0 * fraction;
    let note = match (rank, exact) {
        (Some(r), Some(x)) if x <= p.x_min() => format!("{pct:.0}% of the reference is already reached at the smallest measured rank {r}; the true crossing may be lower"),
        (Some(r), Some(x)) => format!("{pct:.0}% of the reference is first reached at rank {r} (exact crossing r = {x:.3})"),
        (None, Some(x)) => format!("{pct:.0}% of the reference is reached at r = {x:.3}, between integer ranks"),
        _ => format!(
            "the curve never reaches {pct:.0}% of the reference inside the measured range {}..{} (its maximum is {:.1}% of the reference)",
            p.x_min(),
            p.x_max(),
            100.0 * curve_max(p) / reference
        ),
    };
    Crossing {
        fraction,
        level,
        rank,
        exact,
        note,
    }
}

/// The curve's maximum on the measured range. A PCHIP curve is monotone on
/// every piece (zero slope at every interior extremum of the data), so its
/// maximum is the largest measured value.
pub fn curve_max(p: &Pchip) -> f64 {
    p.knots()
        .iter()
        .map(|&x| p.value(x))
        .fold(f64::MIN, f64::max)
}
