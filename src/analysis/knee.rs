//! The effective knee: the integer rank whose point on the PCHIP curve lies
//! farthest from the secant joining the curve's two end points.
//!
//! The perpendicular distance from a point to a line is its vertical
//! distance times a constant (cos of the line's angle), so the knee does not
//! depend on how accuracy is scaled against rank; it does depend on the
//! rank axis, which is linear by default or log2 as an option.

use super::pchip::Pchip;
use super::region::integer_ranks;
use serde::{Deserialize, Serialize};

/// The rank axis on which distances are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KneeAxis {
    Linear,
    Log2,
}

impl KneeAxis {
    fn map(self, r: f64) -> f64 {
        match self {
            KneeAxis::Linear => r,
            KneeAxis::Log2 => r.log2(),
        }
    }
}

/// The knee and its distance from the secant (in (axis(r), accuracy) units).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Knee {
    pub rank: usize,
    pub distance: f64,
}

/// The knee of `p` over the integer ranks of its measured range; ties go to
/// the smaller rank. None when the range holds fewer than three integers.
pub fn knee(p: &Pchip, axis: KneeAxis) -> Option<Knee> {
    let ranks = integer_ranks(p);
    let (r0, r1) = (*ranks.start() as f64, *ranks.end() as f64);
    if r1 - r0 < 2.0 {
        return None;
    }
    let (x0, x1) = (axis.map(r0), axis.map(r1));
    let (y0, y1) = (p.value(r0), p.value(r1));
    let (dx, dy) = (x1 - x0, y1 - y0);
    let norm = (dx * dx + dy * dy).sqrt();
    let mut best: Option<Knee> = None;
    for r in ranks {
        let (x, y) = (axis.map(r as f64), p.value(r as f64));
        let distance = ((y - y0) * dx - (x - x0) * dy).abs() / norm;
        if best.is_none_or(|b| distance > b.distance) {
            best = Some(Knee { rank: r, distance });
        }
    }
    best
}
