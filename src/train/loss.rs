//! The training objective: a weighted sum of the losses of METHOD.md.
//!
//! ```text
//! L = w_ce · CE(s, y)
//!   + w_kd · [(1 - α) · CE(s, y) + α · T² · KL(softmax(t/T) || softmax(s/T))]
//!   + w_feature · mean over the 2·depth + 1 terms of (MSE + 1 - cos)
//! ```
//! The feature terms are every block's attention output and MLP output
//! (each sub-layer's output before the residual add) and the logits; cos is
//! taken per token row (per sample for the logits), MSE over all elements.
//! The logit terms go to the fused `ops::loss::logit_loss`, the block features
//! to `ops::loss::feature_loss`.

use crate::ops::loss::LogitLossConfig;
use anyhow::{bail, Context, Result};

/// Weights and settings of the objective.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossSpec {
    pub ce: f32,
    pub kd: f32,
    pub feature: f32,
    /// Share of KD in the `kd` term (reference 0.5).
    pub alpha: f32,
    /// KD temperature (reference 4).
    pub temperature: f32,
    pub label_smoothing: f32,
}

impl LossSpec {
    /// Hard-label cross-entropy only (teacher training).
    pub fn ce() -> Self {
        LossSpec {
            ce: 1.0,
            kd: 0.0,
            feature: 0.0,
            alpha: 0.5,
            temperature: 4.0,
            label_smoothing: 0.0,
        }
    }

    /// Parse `kd`, `feature`, `ce`, or weights like `kd=1,feature=0.5`.
    pub fn parse(text: &str, alpha: f32, temperature: f32, label_smoothing: f32) -> Result<Self> {
        let mut spec = LossSpec {
            ce: 0.0,
            kd: 0.0,
            feature: 0.0,
            alpha,
            temperature,
            label_smoothing,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = match part.split_once('=') {
                Some((n, w)) => (
                    n.trim(),
                    w.trim().parse::<f32>().with_context(|| {
                        format!("loss weight '{w}' in '{part}' is not a number")
                    })?,
                ),
                None => (part, 1.0),
            };
            if !weight.is_finite() || weight < 0.0 {
                bail!("loss weight of '{name}' must be a non-negative number, got {weight}");
            }
            match name {
                "ce" => spec.ce += weight,
                "kd" => spec.kd += weight,
                "feature" => spec.feature += weight,
                other => bail!(
                    "unknown loss '{other}': use kd, feature, ce, or weights like kd=1,feature=0.5"
                ),
            }
        }
        if spec.ce + spec.kd + spec.feature == 0.0 {
            bail!("loss '{text}' has no positive weight");
        }
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--alpha must be in [0, 1], got {alpha}");
        }
        if temperature.is_nan() || temperature <= 0.0 {
            bail!("--temperature must be positive, got {temperature}");
        }
        if !(0.0..1.0).contains(&label_smoothing) {
            bail!("--label-smoothing must be in [0, 1), got {label_smoothing}");
        }
        Ok(spec)
    }

    /// True when the teacher's logits are needed.
    pub fn needs_teacher(&self) -> bool {
        self.kd > 0.0 || self.feature > 0.0
    }

    /// True when the teacher's block features are needed (so cached logits
    /// are not enough).
    pub fn needs_features(&self) -> bool {
        self.feature > 0.0
    }

    /// Weight of each of the `2·depth + 1` feature terms.
    pub fn feature_term_weight(&self, depth: usize) -> f32 {
        self.feature / (2 * depth + 1) as f32
    }

    /// The fused logit loss's settings for a model of `depth` blocks.
    pub fn logit_config(&self, depth: usize) -> LogitLossConfig {
        LogitLossConfig {
            ce_weight: self.ce + self.kd * (1.0 - self.alpha),
            label_smoothing: self.label_smoothing,
            kd_weight: self.kd * self.alpha,
            temperature: self.temperature,
            feature_weight: self.feature_term_weight(depth),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kd_mixes_ce_and_kd_by_alpha() {
        let s = LossSpec::parse("kd", 0.5, 4.0, 0.0).unwrap();
        let c = s.logit_config(12);
        assert_eq!(
            (c.ce_weight, c.kd_weight, c.feature_weight),
            (0.5, 0.5, 0.0)
        );
        assert!(s.needs_teacher() && !s.needs_features());
    }

    #[test]
    fn feature_weight_is_shared_over_all_terms() {
        let s = LossSpec::parse("feature", 0.5, 4.0, 0.0).unwrap();
        assert_eq!(s.feature_term_weight(12), 1.0 / 25.0);
        let c = s.logit_config(12);
        assert_eq!((c.ce_weight, c.kd_weight), (0.0, 0.0));
        assert!(s.needs_features());
    }

    #[test]
    fn weighted_sums_parse_and_bad_input_is_named() {
        let s = LossSpec::parse("kd=1, feature=0.5,ce=0.25", 0.5, 4.0, 0.1).unwrap();
        assert_eq!((s.kd, s.feature, s.ce), (1.0, 0.5, 0.25));
        assert!(LossSpec::parse("mse", 0.5, 4.0, 0.0)
            .unwrap_err()
            .to_string()
            .contains("unknown loss 'mse'"));
        assert!(LossSpec::parse("kd=x", 0.5, 4.0, 0.0)
            .unwrap_err()
            .to_string()
            .contains("'x'"));
        assert!(LossSpec::parse("kd", 1.5, 4.0, 0.0).is_err());
        assert!(LossSpec::parse("kd", 0.5, 0.0, 0.0).is_err());
        assert!(LossSpec::parse("ce=0", 0.5, 4.0, 0.0).is_err());
    }
}
