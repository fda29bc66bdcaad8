//! The PCHIP interpolant (piecewise cubic Hermite, monotone), with exactly
//! SciPy's `PchipInterpolator` derivative rules and `PPoly` evaluation, so
//! the engine's curve matches SciPy's to rounding (tests/data/pchip_golden.json).
//!
//! Derivatives at the knots (SciPy `_find_derivatives`):
//! - two points: both derivatives are the one slope (a straight line);
//! - inside: zero when the neighbouring slopes differ in sign or either is
//!   zero, else the weighted harmonic mean with w1 = 2h_k + h_{k-1},
//!   w2 = h_k + 2h_{k-1};
//! - ends: the one-sided three-point formula, zero when its sign differs
//!   from the end slope, 3x the end slope when the two end slopes differ in
//!   sign and it is larger than that.
//!
//! Each piece is stored as SciPy stores it: c0 s^3 + c1 s^2 + c2 s + c3 in
//! the local coordinate s = x - x_i, summed in the same order.

use anyhow::{bail, Result};

/// A PCHIP curve through points with strictly increasing x.
#[derive(Clone, Debug)]
pub struct Pchip {
    x: Vec<f64>,
    /// Per piece: [c0, c1, c2, c3] (cubic, quadratic, linear, constant).
    c: Vec<[f64; 4]>,
}

impl Pchip {
    /// Fit through (x_i, y_i). Needs at least two points, finite values and
    /// strictly increasing x (callers sort and check ranks first).
    pub fn new(x: &[f64], y: &[f64]) -> Result<Pchip> {
        if x.len() != y.len() {
            bail!("PCHIP: {} x values but {} y values", x.len(), y.len());
        }
        if x.len() < 2 {
            bail!("PCHIP needs at least two points, got {}", x.len());
        }
        if let Some(i) = (0..x.len()).find(|&i| !x[i].is_finite() || !y[i].is_finite()) {
            bail!(
                "PCHIP: point {i} is not finite (x = {}, y = {})",
                x[i],
                y[i]
            );
        }
        if let Some(i) = (1..x.len()).find(|&i| x[i] <= x[i - 1]) {
            bail!(
                "PCHIP: x must increase strictly, but x[{}] = {} follows x[{}] = {}",
                i,
                x[i],
                i - 1,
                x[i - 1]
            );
        }
        let d = derivatives(x, y);
        let c = (0..x.len() - 1)
            .map(|i| {
                let dx = x[i + 1] - x[i];
                let slope = (y[i + 1] - y[i]) / dx;
                let t = (d[i] + d[i + 1] - 2.0 * slope) / dx;
                [t / dx, (slope - d[i]) / dx - t, d[i], y[i]]
            })
            .collect();
        Ok(Pchip { x: x.to_vec(), c })
    }

    /// The knots.
    pub fn knots(&self) -> &[f64] {
        &self.x
    }

    /// First knot.
    pub fn x_min(&self) -> f64 {
        self.x[0]
    }

    /// Last knot.
    pub fn x_max(&self) -> f64 {
        self.x[self.x.len() - 1]
    }

    /// Number of cubic pieces.
    pub fn pieces(&self) -> usize {
        self.c.len()
    }

    /// The piece holding x (SciPy's rule: [x_i, x_{i+1}), the last piece
    /// closed; outside the knots the end pieces extrapolate).
    pub fn piece_of(&self, x: f64) -> usize {
        let n = self.c.len();
        match self.x[1..n].iter().position(|&k| x < k) {
            Some(i) => i,
            None => n - 1,
        }
    }

    /// The curve's value at x.
    pub fn value(&self, x: f64) -> f64 {
        let i = self.piece_of(x);
        self.piece_value(i, x - self.x[i])
    }

    /// The curve's first derivative at x.
    pub fn derivative(&self, x: f64) -> f64 {
        let i = self.piece_of(x);
        let s = x - self.x[i];
        let c = &self.c[i];
        // SciPy's order: c2 + 2 c1 s + 3 c0 s^2, powers built up term by term.
        let mut res = c[2];
        let z = s;
        res += c[1] * z * 2.0;
        res += c[0] * (z * s) * 3.0;
        res
    }

    /// Piece `i` at local coordinate s (c3 + c2 s + c1 s^2 + c0 s^3, in SciPy's order).
    pub fn piece_value(&self, i: usize, s: f64) -> f64 {
        let c = &self.c[i];
        let mut res = c[3];
        let mut z = s;
        res += c[2] * z;
        z *= s;
        res += c[1] * z;
        z *= s;
        res += c[0] * z;
        res
    }

    /// Piece `i`'s coefficients [c0, c1, c2, c3].
    pub fn coefficients(&self, i: usize) -> [f64; 4] {
        self.c[i]
    }

    /// Smallest x in [x_min, x_max] where the curve reaches `level` (a value
    /// of at least `level`), found piece by piece in increasing x: each piece is split
    /// at the roots of its derivative into monotone parts and the first part
    /// that ends at or above `level` is bisected to the last bit. None when
    /// the curve stays below `level` on the measured range.
    pub fn first_reaching(&self, level: f64) -> Option<f64> {
        for i in 0..self.pieces() {
            let h = self.x[i + 1] - self.x[i];
            let g = |s: f64| self.piece_value(i, s) - level;
            let mut cuts = vec![0.0];
            cuts.extend(critical_points(&self.c[i], h));
            cuts.push(h);
            for w in cuts.windows(2) {
                let (a, b) = (w[0], w[1]);
                if g(a) >= 0.0 {
                    return Some(self.x[i] + a);
                }
                if g(b) >= 0.0 {
                    return Some(self.x[i] + bisect(&g, a, b));
                }
            }
        }
        None
    }
}

/// Roots of the piece's derivative 3 c0 s^2 + 2 c1 s + c2 strictly inside (0, h), ascending.
fn critical_points(c: &[f64; 4], h: f64) -> Vec<f64> {
    let (a, b, cc) = (3.0 * c[0], 2.0 * c[1], c[2]);
    let mut roots = Vec::new();
    if a == 0.0 {
        if b != 0.0 {
            roots.push(-cc / b);
        }
    } else {
        let disc = b * b - 4.0 * a * cc;
        if disc >= 0.0 {
            // Numerically stable quadratic roots.
            let q = -0.5 * (b + b.signum() * disc.sqrt());
            if q != 0.0 {
                roots.push(q / a);
                roots.push(cc / q);
            } else {
                roots.push(0.0);
            }
        }
    }
    let mut inside: Vec<f64> = roots
        .into_iter()
        .filter(|&s| s.is_finite() && s > 0.0 && s < h)
        .collect();
    inside.sort_by(|p, q| p.total_cmp(q));
    inside
}

/// Bisect g on [a, b] with g(a) < 0 <= g(b) down to adjacent floats;
/// returns the point where g first reaches zero (to one ulp).
fn bisect(g: &dyn Fn(f64) -> f64, mut a: f64, mut b: f64) -> f64 {
    loop {
        let m = 0.5 * (a + b);
        if m <= a || m >= b {
            return b;
        }
        if g(m) >= 0.0 {
            b = m;
        } else {
            a = m;
        }
    }
}

/// SciPy's derivative rules at the knots (see the module doc).
fn derivatives(x: &[f64], y: &[f64]) -> Vec<f64> {
    let n = x.len();
    let h: Vec<f64> = (0..n - 1).map(|k| x[k + 1] - x[k]).collect();
    let m: Vec<f64> = (0..n - 1).map(|k| (y[k + 1] - y[k]) / h[k]).collect();
    if n == 2 {
        return vec![m[0], m[0]];
    }
    let mut d = vec![0.0; n];
    for k in 1..n - 1 {
        let (ml, mr) = (m[k - 1], m[k]);
        if sign(ml) != sign(mr) || ml == 0.0 || mr == 0.0 {
            continue;
        }
        let w1 = 2.0 * h[k] + h[k - 1];
        let w2 = h[k] + 2.0 * h[k - 1];
        let whmean = (w1 / ml + w2 / mr) / (w1 + w2);
        d[k] = 1.0 / whmean;
    }
    d[0] = edge(h[0], h[1], m[0], m[1]);
    d[n - 1] = edge(h[n - 2], h[n - 3], m[n - 2], m[n - 3]);
    d
}

/// SciPy's `_edge_case`: the one-sided three-point derivative at an end.
fn edge(h0: f64, h1: f64, m0: f64, m1: f64) -> f64 {
    let d = ((2.0 * h0 + h1) * m0 - h0 * m1) / (h0 + h1);
    if sign(d) != sign(m0) {
        0.0
    } else if sign(m0) != sign(m1) && d.abs() > 3.0 * m0.abs() {
        3.0 * m0
    } else {
        d
    }
}

/// numpy's sign: -1, 0 or 1.
fn sign(v: f64) -> i8 {
    if v > 0.0 {
        1
    } else if v < 0.0 {
        -1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_points_are_a_line() {
        let p = Pchip::new(&[1.0, 3.0], &[0.0, 1.0]).unwrap();
        assert_eq!(p.value(2.0), 0.5);
        assert_eq!(p.derivative(2.5), 0.5);
    }

    #[test]
    fn passes_through_points_and_stays_monotone() {
        let x = [2.0, 4.0, 8.0, 16.0, 64.0, 256.0];
        let y = [0.1, 0.2, 0.5, 0.8, 0.9, 0.91];
        let p = Pchip::new(&x, &y).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((p.value(*a) - b).abs() < 1e-15);
        }
        let mut last = f64::MIN;
        for k in 2..=256 {
            let v = p.value(k as f64);
            assert!(v >= last - 1e-15, "not monotone at {k}");
            last = v;
        }
    }

    #[test]
    fn first_reaching_matches_dense_scan() {
        let x = [1.0, 2.0, 5.0, 9.0, 10.0];
        let y = [0.0, 0.6, 0.4, 0.9, 0.8];
        let p = Pchip::new(&x, &y).unwrap();
        let r = p.first_reaching(0.5).unwrap();
        assert!((p.value(r) - 0.5).abs() < 1e-14);
        let first_dense = (0..=9000)
            .map(|i| 1.0 + i as f64 * 1e-3)
            .find(|&t| p.value(t) >= 0.5)
            .unwrap();
        assert!((first_dense - r).abs() <= 1e-3);
        assert!(p.first_reaching(0.95).is_none());
        assert_eq!(p.first_reaching(-1.0), Some(1.0));
    }

    #[test]
    fn rejects_bad_points() {
        assert!(Pchip::new(&[1.0], &[1.0]).is_err());
        assert!(Pchip::new(&[1.0, 1.0], &[1.0, 2.0]).is_err());
        assert!(Pchip::new(&[1.0, 2.0], &[f64::NAN, 2.0]).is_err());
    }
}
