#!/usr/bin/env python3
"""Writes tests/data/pchip_golden.json: SciPy PchipInterpolator values, first
derivatives and threshold crossings for many point sets, which the Rust PCHIP
(src/analysis/pchip.rs) must match to 1e-12 relative (tests/analysis.rs).

Run: pip install --target /tmp/pydeps scipy numpy
     PYTHONPATH=/tmp/pydeps python3 scripts/pchip_golden.py
"""
import json
import os

import numpy as np
import scipy
from scipy.interpolate import PchipInterpolator

rng = np.random.default_rng(20240604)


def uneven_x(n):
    x = np.cumsum(rng.uniform(0.05, 5.0, n)) + rng.uniform(-3, 3)
    return x


def cases():
    out = []
    # Random monotone sets, uneven spacing.
    for _ in range(40):
        n = int(rng.integers(3, 12))
        out.append(("monotone", uneven_x(n), np.cumsum(rng.uniform(0, 1, n))))
    # Random non-monotone sets.
    for _ in range(40):
        n = int(rng.integers(3, 12))
        out.append(("random", uneven_x(n), rng.normal(0, 1, n)))
    # Two points.
    for _ in range(8):
        out.append(("two points", uneven_x(2), rng.normal(0, 1, 2)))
    # Flat stretches.
    for _ in range(12):
        n = int(rng.integers(4, 10))
        y = np.round(rng.uniform(0, 3, n))
        out.append(("flat stretches", uneven_x(n), y))
    # Sign changes next to the ends (exercise the end rules: zeroing and 3x clamp).
    for _ in range(20):
        n = int(rng.integers(3, 7))
        x = uneven_x(n)
        y = rng.normal(0, 1, n)
        y[1] = y[0] + rng.choice([-1, 1]) * rng.uniform(0.01, 2)
        y[2] = y[1] - np.sign(y[1] - y[0]) * rng.uniform(0.01, 2)
        if n > 3:
            y[-2] = y[-1] + rng.uniform(-2, 2)
            y[-3] = y[-2] - np.sign(y[-1] - y[-2]) * rng.uniform(0.01, 2)
        out.append(("sign change at ends", x, y))
    # Accuracy-like curves on rank grids.
    for _ in range(10):
        ranks = np.unique(np.round(2 ** rng.uniform(1, 8, int(rng.integers(3, 14)))))
        if len(ranks) < 2:
            continue
        acc = 0.75 / (1 + np.exp(-(np.log2(ranks) - rng.uniform(2, 6)) * rng.uniform(0.8, 2.5)))
        acc = acc + rng.normal(0, 0.01, len(acc))
        out.append(("accuracy curve", ranks.astype(float), acc))
    return out


def first_crossing(pp, level, x0, y0):
    """First x in the measured range where the curve reaches level, or None."""
    if y0 >= level:
        return float(x0)
    roots = pp.solve(level, extrapolate=False)
    roots = roots[np.isfinite(roots)]
    return float(roots.min()) if len(roots) else None


def main():
    records = []
    for kind, x, y in cases():
        p = PchipInterpolator(x, y)
        d = p.derivative()
        q = np.sort(np.concatenate([x, rng.uniform(x[0], x[-1], 12)]))
        levels = list(rng.uniform(y.min() - 0.1 * abs(y.min()), y.max(), 3)) + [float(y.max()) + 1.0]
        crossings = []
        for level in levels:
            # Skip levels touched only tangentially (a flat piece or an extremum exactly
            # at the level): a root solver cannot define those to 1e-12.
            if np.any(np.isclose(y, level, rtol=0, atol=1e-9)):
                continue
            crossings.append({"level": float(level), "x": first_crossing(p, level, x[0], y[0])})
        records.append({
            "kind": kind,
            "x": x.tolist(),
            "y": y.tolist(),
            "query": q.tolist(),
            "value": p(q).tolist(),
            "derivative": d(q).tolist(),
            "crossings": crossings,
        })
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "pchip_golden.json")
    with open(path, "w") as f:
        json.dump({"scipy": scipy.__version__, "cases": records}, f)
    print(f"wrote {len(records)} cases to {os.path.normpath(path)} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
