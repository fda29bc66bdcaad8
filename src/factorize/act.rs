//! Activation-aware factors (`--init svd-act`), as SVD-LLM and ASVD do for
//! language models: the rank-r factors that minimize the error of the
//! layer's outputs on real inputs, instead of the error of the weights.
//!
//! The layer `y = W x + b` keeps its bias, so on an input x the factors'
//! error is `(W − UV) x`, and over the calibration inputs
//! `E‖(W − UV) x‖² = tr(E C Eᵀ)` with `E = W − UV` and `C = E[x xᵀ]` the
//! *uncentered* second moment (SVD-LLM's `X Xᵀ`; a centered covariance
//! would leave out the error on the inputs' mean, which the kept bias does
//! not absorb). With `S = C^½` (symmetric), `tr(E C Eᵀ) = ‖W S − UV S‖²_F`,
//! so the best rank-r `UV S` is the truncated SVD of `W S` (Eckart–Young):
//!
//! ```text
//! W S ≈ P_r Σ_r R_rᵀ,   U = P_r Σ_r^½,   V = Σ_r^½ R_rᵀ S⁻¹
//! ```
//! `C` is regularized as `C + λ I` with `λ = RIDGE · tr(C) / n` (a fraction
//! of its mean eigenvalue), so that `S` is invertible when the inputs span
//! fewer than n directions (LayerNorm outputs, few calibration rows). The
//! ridge cannot make the factors worse than plain SVD's on the calibration
//! inputs: with `f(E) = tr(E C Eᵀ)` and `g(E) = ‖E‖²`, these factors
//! minimize `f + λ g` and plain SVD's minimize `g`, so
//! `f(E_act) ≤ f(E_svd) + λ (g(E_svd) − g(E_act)) ≤ f(E_svd)`. At full rank
//! `W S = P Σ Rᵀ` exactly and `UV = W S S⁻¹ = W`. Everything is computed
//! in f64 (faer's symmetric eigendecomposition and SVD), the factors
//! rounded to f32 at the end.

use super::{check_layer, relative_error};
use crate::linalg::{product, symmetric_eigen, thin_svd};
use anyhow::{anyhow, bail, Result};
use faer::Mat;

/// The ridge, as a fraction of the mean eigenvalue `tr(C) / n` of the
/// second moment.
pub const RIDGE: f64 = 1e-4;

/// Activation-aware factors of `w` (`[out, inp]`, row-major) at rank `r`,
/// given the second moment `c` (`[inp, inp]`, row-major) of its inputs:
/// returns `U: [out, r]`, `V: [r, inp]` and the relative weight error
/// `‖W − UV‖_F / ‖W‖_F` (larger than plain SVD's; the output error is
/// what these factors make smallest).
pub fn svd_act_factors(
    w: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    c: &[f64],
    name: &str,
) -> Result<(Vec<f32>, Vec<f32>, f64)> {
    check_layer(w, out, inp, r, name)?;
    if c.len() != inp * inp {
        bail!(
            "layer {name}: the input second moment has {} values, [{inp}, {inp}] needs {}",
            c.len(),
            inp * inp
        );
    }
    let (s, s_inv) = root_and_inverse(c, inp, name)?;
    let weight = Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
    let ws = product(weight.as_ref(), s.as_ref());
    let svd = thin_svd(ws.as_ref()).map_err(|e| {
        anyhow!("SVD of W·C^½ of layer {name} [{out}, {inp}] did not converge: {e:?}")
    })?;
    let (p, sigma, rt) = (&svd.u, &svd.s, &svd.v);
    let root: Vec<f64> = (0..r).map(|k| sigma[k].max(0.0).sqrt()).collect();
    // V = Σ_r^½ R_rᵀ S⁻¹, row k: √σ_k (column k of R)ᵀ S⁻¹.
    let v_act = product(
        Mat::<f64>::from_fn(r, inp, |k, j| root[k] * rt[(j, k)]).as_ref(),
        s_inv.as_ref(),
    );
    let u: Vec<f32> = (0..out * r)
        .map(|i| (p[(i / r, i % r)] * root[i % r]) as f32)
        .collect();
    let v: Vec<f32> = (0..r * inp)
        .map(|i| v_act[(i / inp, i % inp)] as f32)
        .collect();
    let rel_error = relative_error(w, &u, &v, out, inp, r);
    Ok((u, v, rel_error))
}

/// The relative output error of factors `u`, `v` of `w` on inputs of
/// second moment `c`: `sqrt(tr(E C Eᵀ) / tr(W C Wᵀ))`, `E = W − UV`, i.e.
/// `‖X (W − UV)ᵀ‖_F / ‖X Wᵀ‖_F` over the calibration rows (no ridge).
pub fn output_error(
    w: &[f32],
    u: &[f32],
    v: &[f32],
    c: &[f64],
    out: usize,
    inp: usize,
    r: usize,
) -> f64 {
    let weight = Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
    let err = Mat::<f64>::from_fn(out, inp, |i, j| {
        weight[(i, j)]
            - (0..r)
                .map(|k| u[i * r + k] as f64 * v[k * inp + j] as f64)
                .sum::<f64>()
    });
    let moment = Mat::<f64>::from_fn(inp, inp, |i, j| c[i * inp + j]);
    let energy = |m: &Mat<f64>| {
        let mc = product(m.as_ref(), moment.as_ref());
        (0..out)
            .map(|i| (0..inp).map(|j| mc[(i, j)] * m[(i, j)]).sum::<f64>())
            .sum::<f64>()
            .max(0.0)
    };
    let total = energy(&weight);
    if total > 0.0 {
        (energy(&err) / total).sqrt()
    } else {
        0.0
    }
}

/// `S = (C + λI)^½` and `S⁻¹` from the symmetric eigendecomposition
/// `C + λI = Q diag(μ) Qᵀ`: `S = Q diag(√μ) Qᵀ`, `S⁻¹ = Q diag(1/√μ) Qᵀ`.
fn root_and_inverse(c: &[f64], n: usize, name: &str) -> Result<(Mat<f64>, Mat<f64>)> {
    if let Some(i) = c.iter().position(|v| !v.is_finite()) {
        bail!("layer {name}: the input second moment holds {} at index {i}; the calibration activations are not finite", c[i]);
    }
    let trace: f64 = (0..n).map(|i| c[i * n + i]).sum();
    // An all-zero input has no direction to prefer: λ = RIDGE gives S ∝ I (plain SVD).
    let lambda = if trace > 0.0 {
        RIDGE * trace / n as f64
    } else {
        RIDGE
    };
    // Symmetrized, so the accumulated rounding cannot make it asymmetric.
    let reg = Mat::<f64>::from_fn(n, n, |i, j| {
        0.5 * (c[i * n + j] + c[j * n + i]) + if i == j { lambda } else { 0.0 }
    });
    let (q, mu) = symmetric_eigen(reg.as_ref()).map_err(|e| anyhow!("eigendecomposition of the input second moment of layer {name} [{n}, {n}] did not converge: {e:?}"))?;
    // μ ≥ λ in exact arithmetic; the clamp keeps rounding from taking a root of a negative.
    let mu: Vec<f64> = (0..n).map(|k| mu[k].max(lambda)).collect();
    let scaled = |f: &dyn Fn(f64) -> f64| {
        product(
            Mat::<f64>::from_fn(n, n, |i, k| q[(i, k)] * f(mu[k])).as_ref(),
            q.as_ref().transpose(),
        )
    };
    Ok((scaled(&|m| m.sqrt()), scaled(&|m| 1.0 / m.sqrt())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::factorize::svd_factors;
    use crate::rng::Rng;

    /// `rows` inputs of dimension `inp`, row-major: Gaussian, scaled per
    /// direction by `decay^j` after a random rotation-like mixing, so
    /// `decay < 1` gives ill-conditioned inputs; plus a mean offset.
    fn inputs(rows: usize, inp: usize, decay: f64, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let z = rng.normal_vec(rows * inp, 1.0);
        let mix = rng.normal_vec(inp * inp, 1.0 / (inp as f32).sqrt());
        let offset = rng.normal_vec(inp, 0.5);
        (0..rows * inp)
            .map(|i| {
                let (row, j) = (i / inp, i % inp);
                let v: f64 = (0..inp)
                    .map(|k| {
                        z[row * inp + k] as f64 * decay.powi(k as i32) * mix[k * inp + j] as f64
                    })
                    .sum();
                v as f32 + offset[j]
            })
            .collect()
    }

    fn second_moment(x: &[f32], rows: usize, inp: usize) -> Vec<f64> {
        let mut c = vec![0f64; inp * inp];
        for row in x.chunks(inp) {
            for i in 0..inp {
                for j in 0..inp {
                    c[i * inp + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        c.iter().map(|v| v / rows as f64).collect()
    }

    /// `‖X Wᵀ − X (UV)ᵀ‖_F`, in f64, row by row.
    fn direct_output_error(
        w: &[f32],
        u: &[f32],
        v: &[f32],
        x: &[f32],
        out: usize,
        inp: usize,
        r: usize,
    ) -> f64 {
        let mut total = 0f64;
        for row in x.chunks(inp) {
            let h: Vec<f64> = (0..r)
                .map(|k| {
                    (0..inp)
                        .map(|j| v[k * inp + j] as f64 * row[j] as f64)
                        .sum()
                })
                .collect();
            for i in 0..out {
                let dense: f64 = (0..inp)
                    .map(|j| w[i * inp + j] as f64 * row[j] as f64)
                    .sum();
                let low: f64 = (0..r).map(|k| u[i * r + k] as f64 * h[k]).sum();
                total += (dense - low).powi(2);
            }
        }
        total.sqrt()
    }

    const SHAPES: [(usize, usize); 4] = [(16, 16), (24, 12), (10, 30), (32, 20)];

    /// Like plain SVD's (`svd_factors_are_the_same_bits_on_any_thread_count`):
    /// the eigendecomposition, the SVD and the products all at the width of
    /// the model's MLP layers.
    #[test]
    fn svd_act_factors_are_the_same_bits_on_any_thread_count() {
        let (out, inp, rows) = (128, 256, 300);
        let w = Rng::new(3).normal_vec(out * inp, 0.3);
        let c = second_moment(&inputs(rows, inp, 0.99, 4), rows, inp);
        crate::testing::same_on_any_thread_count("svd_act_factors", || {
            let (u, v, err) = svd_act_factors(&w, out, inp, 4, &c, "w").unwrap();
            let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let output = output_error(&w, &u, &v, &c, out, inp, 4).to_bits();
            (bits(&u), bits(&v), err.to_bits(), output)
        });
    }

    #[test]
    fn full_rank_reproduces_the_layer() {
        for (n, &(out, inp)) in SHAPES.iter().enumerate() {
            for decay in [1.0, 0.6] {
                let w = Rng::new(n as u64).normal_vec(out * inp, 0.3);
                let x = inputs(200, inp, decay, 10 + n as u64);
                let r = out.min(inp);
                let c = second_moment(&x, 200, inp);
                let (u, v, err) = svd_act_factors(&w, out, inp, r, &c, "w").unwrap();
                assert!(
                    err < 1e-5,
                    "[{out}, {inp}] decay {decay}: weight error {err}"
                );
                assert!(output_error(&w, &u, &v, &c, out, inp, r) < 1e-5);
                let scale = direct_output_error(
                    &w,
                    &vec![0.0; out * r],
                    &vec![0.0; r * inp],
                    &x,
                    out,
                    inp,
                    r,
                );
                let e = direct_output_error(&w, &u, &v, &x, out, inp, r) / scale;
                assert!(e < 1e-5, "[{out}, {inp}] decay {decay}: output error {e}");
            }
        }
    }

    /// On the calibration inputs, svd-act's output error is never above
    /// plain SVD's (within fp32 rounding of the factors), at every rank,
    /// for well- and ill-conditioned inputs (decay 0.5: the smallest
    /// direction is 2^-29 of the largest).
    #[test]
    fn output_error_is_never_above_plain_svd() {
        let mut better = 0;
        for (n, &(out, inp)) in SHAPES.iter().enumerate() {
            for (d, decay) in [1.0, 0.8, 0.5].into_iter().enumerate() {
                let w = Rng::new(100 + n as u64).normal_vec(out * inp, 0.3);
                let rows = 3 * inp;
                let x = inputs(rows, inp, decay, 200 + (3 * n + d) as u64);
                let c = second_moment(&x, rows, inp);
                for r in 1..out.min(inp) {
                    let (ua, va, _) = svd_act_factors(&w, out, inp, r, &c, "w").unwrap();
                    let (us, vs, _) = svd_factors(&w, out, inp, r, "w").unwrap();
                    let act = direct_output_error(&w, &ua, &va, &x, out, inp, r);
                    let svd = direct_output_error(&w, &us, &vs, &x, out, inp, r);
                    let scale = direct_output_error(
                        &w,
                        &vec![0.0; out * r],
                        &vec![0.0; r * inp],
                        &x,
                        out,
                        inp,
                        r,
                    );
                    assert!(
                        (output_error(&w, &ua, &va, &c, out, inp, r) - act / scale).abs() < 1e-6,
                        "the moment form equals the direct one"
                    );
                    assert!(
                        act <= svd * (1.0 + 1e-5) + 1e-6,
                        "[{out}, {inp}] decay {decay} rank {r}: svd-act {act} > svd {svd}"
                    );
                    better += (act < 0.99 * svd) as usize;
                }
            }
        }
        assert!(
            better > 20,
            "svd-act should be clearly better on most of these, was on {better}"
        );
    }

    #[test]
    fn bad_moments_are_errors_naming_the_layer() {
        let w = vec![1.0; 12];
        let e = svd_act_factors(&w, 3, 4, 2, &[0.0; 15], "blocks.0.mlp.fc1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks.0.mlp.fc1") && e.contains("[4, 4]"),
            "{e}"
        );
        let mut c = vec![0.0; 16];
        c[5] = f64::NAN;
        assert!(svd_act_factors(&w, 3, 4, 2, &c, "x")
            .unwrap_err()
            .to_string()
            .contains("not finite"));
        assert!(svd_act_factors(&w, 3, 4, 4, &[0.0; 16], "x")
            .unwrap_err()
            .to_string()
            .contains("rank 4"));
        // All-zero inputs leave nothing to weigh by: plain SVD's factors.
        let w = Rng::new(3).normal_vec(12, 1.0);
        let (ua, va, ea) = svd_act_factors(&w, 3, 4, 2, &[0.0; 16], "x").unwrap();
        let (_, _, es) = svd_factors(&w, 3, 4, 2, "x").unwrap();
        assert!((ea - es).abs() < 1e-5, "{ea} vs {es}");
        assert_eq!((ua.len(), va.len()), (6, 8));
    }
}
