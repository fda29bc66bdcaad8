//! Weight spectra of a checkpoint: singular values of every factorizable
//! layer of the transformer blocks (q, k, v, proj, fc1, fc2; a low-rank
//! layer's product U·V), read through the same loader as `eval`, and the
//! ranks they suggest, to set beside the distillation estimate of the
//! effective rank.
//!
//! Per layer: entropy effective rank exp(H(p)) with p = σ / Σσ, stable rank
//! ‖W‖_F² / ‖W‖_2², and the smallest ranks keeping 90/95/99% of Σσ² (the
//! energy a rank-k truncation keeps).

use crate::model::import::{load_any, ImportOptions};
use crate::model::params::{BlockLinear, Linear};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// One layer's spectrum and the ranks derived from it.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSpectrum {
    pub name: String,
    /// [out, in]
    pub shape: [usize; 2],
    /// Some(r) for a low-rank layer (U·V).
    pub stored_rank: Option<usize>,
    pub entropy_rank: f64,
    pub stable_rank: f64,
    pub rank_90: usize,
    pub rank_95: usize,
    pub rank_99: usize,
    /// Descending.
    pub singular_values: Vec<f64>,
}

/// Every layer's spectrum.
#[derive(Clone, Debug, Serialize)]
pub struct SpectrumReport {
    pub checkpoint: String,
    pub layers: Vec<LayerSpectrum>,
}

/// The numbers derived from singular values (descending, non-negative).
pub fn spectrum_of(
    name: &str,
    shape: [usize; 2],
    stored_rank: Option<usize>,
    sv: Vec<f64>,
) -> LayerSpectrum {
    let sum: f64 = sv.iter().sum();
    let energy: f64 = sv.iter().map(|s| s * s).sum();
    let entropy = if sum > 0.0 {
        -sv.iter()
            .map(|s| s / sum)
            .filter(|&p| p > 0.0)
            .map(|p| p * p.ln())
            .sum::<f64>()
    } else {
        0.0
    };
    let keep = |frac: f64| {
        let mut acc = 0.0;
        for (i, s) in sv.iter().enumerate() {
            acc += s * s;
            if acc >= frac * energy {
                return i + 1;
            }
        }
        sv.len()
    };
    let top = sv.first().copied().unwrap_or(0.0);
    LayerSpectrum {
        name: name.to_string(),
        shape,
        stored_rank,
        entropy_rank: if sum > 0.0 { entropy.exp() } else { 0.0 },
        stable_rank: if top > 0.0 { energy / (top * top) } else { 0.0 },
        rank_90: keep(0.90),
        rank_95: keep(0.95),
        rank_99: keep(0.99),
        singular_values: sv,
    }
}

/// Singular values (descending) of a row-major [rows, cols] matrix.
pub fn singular_values(rows: usize, cols: usize, w: &[f64]) -> Result<Vec<f64>> {
    let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| w[i * cols + j]);
    let mut sv = crate::linalg::singular_values(m.as_ref())
        .map_err(|e| anyhow!("SVD of a {rows}x{cols} matrix did not converge: {e:?}"))?;
    sv.sort_by(|a, b| b.total_cmp(a));
    Ok(sv)
}

/// Spectra of every factorizable layer of a checkpoint, read the way `eval`
/// reads it (`model::import::load_any`: engine, timm, torchvision and
/// Hugging Face names; fused q/k/v split; low-rank layers as U·V).
pub fn weight_spectra(path: &Path) -> Result<SpectrumReport> {
    let ck = load_any(path, &ImportOptions::default())?;
    let mut layers = Vec::new();
    for (i, block) in ck.params.blocks.iter().enumerate() {
        for l in BlockLinear::ALL {
            let name = format!("blocks.{i}.{}", l.name());
            let (out, inp) = l.shape(&ck.cfg);
            let layer = match block.linear(l) {
                Linear::Dense { weight, .. } => spectrum_of(
                    &name,
                    [out, inp],
                    None,
                    singular_values(out, inp, &to_f64(weight))?,
                ),
                Linear::LowRank { u, v, .. } => {
                    lowrank_layer(&name, out, inp, ck.ranks[i][l].unwrap_or(0), u, v)?
                }
            };
            layers.push(layer);
        }
    }
    Ok(SpectrumReport {
        checkpoint: path.display().to_string(),
        layers,
    })
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A low-rank layer: the spectrum of W = U [out, r] · V [r, in] (at most r values).
fn lowrank_layer(
    name: &str,
    out: usize,
    inp: usize,
    r: usize,
    u: &[f32],
    v: &[f32],
) -> Result<LayerSpectrum> {
    if r == 0 || u.len() != out * r || v.len() != r * inp {
        bail!(
            "{name}: U of {} and V of {} values do not make a rank-{r} [{out}, {inp}] layer",
            u.len(),
            v.len()
        );
    }
    let mut w = vec![0.0f64; out * inp];
    for a in 0..out {
        for k in 0..r {
            let uk = u[a * r + k] as f64;
            let vrow = &v[k * inp..(k + 1) * inp];
            for (wb, &vb) in w[a * inp..(a + 1) * inp].iter_mut().zip(vrow) {
                *wb += uk * vb as f64;
            }
        }
    }
    let mut sv = singular_values(out, inp, &w)?;
    sv.truncate(r);
    Ok(spectrum_of(name, [out, inp], Some(r), sv))
}

impl SpectrumReport {
    /// Median over layers of each derived rank: (entropy, stable, 90, 95, 99).
    pub fn medians(&self) -> [f64; 5] {
        let med = |f: &dyn Fn(&LayerSpectrum) -> f64| {
            let mut v: Vec<f64> = self.layers.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                0.5 * (v[n / 2 - 1] + v[n / 2])
            }
        };
        [
            med(&|l| l.entropy_rank),
            med(&|l| l.stable_rank),
            med(&|l| l.rank_90 as f64),
            med(&|l| l.rank_95 as f64),
            med(&|l| l.rank_99 as f64),
        ]
    }

    /// The per-layer table (terminal and markdown).
    pub fn table_md(&self) -> String {
        let mut s = String::from("| layer | shape | entropy rank | stable rank | 90% | 95% | 99% |\n|---|---|---|---|---|---|---|\n");
        for l in &self.layers {
            let _ = writeln!(
                s,
                "| {} | {}x{} | {:.1} | {:.2} | {} | {} | {} |",
                l.name,
                l.shape[0],
                l.shape[1],
                l.entropy_rank,
                l.stable_rank,
                l.rank_90,
                l.rank_95,
                l.rank_99
            );
        }
        let m = self.medians();
        let _ = writeln!(
            s,
            "| **median** | | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} |",
            m[0], m[1], m[2], m[3], m[4]
        );
        s
    }

    /// The summary.md section, beside the distillation estimate when there is one.
    pub fn summary_md(&self, r_lo: Option<usize>, r_hi: Option<usize>) -> String {
        let m = self.medians();
        let mut s = format!("\n## Weight spectra of `{}`\n\n", self.checkpoint);
        if r_lo.is_some() || r_hi.is_some() {
            let f = |r: Option<usize>| r.map_or("not reached".into(), |r| r.to_string());
            let _ = writeln!(
                s,
                "Distillation estimate: r_lo = {}, r_hi = {}. Weight spectra (median over layers): entropy rank {:.1}, stable rank {:.2}, 90/95/99% energy ranks {:.0}/{:.0}/{:.0}.\n",
                f(r_lo),
                f(r_hi),
                m[0],
                m[1],
                m[2],
                m[3],
                m[4]
            );
        }
        s.push_str(&self.table_md());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::singular_values;

    /// `analyze` and `sensitivity` may run inside a pool of any size.
    #[test]
    fn singular_values_are_the_same_bits_on_any_thread_count() {
        let (rows, cols) = (256, 128);
        let w: Vec<f64> = crate::rng::Rng::new(5)
            .normal_vec(rows * cols, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        crate::testing::same_on_any_thread_count("singular_values", || {
            let sv = singular_values(rows, cols, &w).unwrap();
            sv.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        });
    }
}
