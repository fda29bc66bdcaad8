//! The losses of METHOD.md, forward and gradient in one pass, per row:
//!
//! ```text
//! CE (label smoothing ε, C classes)   q = (1−ε)·onehot(y) + ε/C
//!     L = −Σ q log softmax(s),                     dL/ds = softmax(s) − q
//! KD (temperature T)                   p_t = softmax(t/T),  p_s = softmax(s/T)
//!     L = T² · Σ p_t (log p_t − log p_s),          dL/ds = T · (p_s − p_t)
//! feature (per row of C values)        L = Σ(s − t)²/C + 1 − cos(s, t)
//!     dL/ds = 2(s − t)/C − (t/(‖s‖‖t‖) − cos · s/‖s‖²)
//! ```
//! `logit_loss` mixes CE, KD and the feature term on the logits with the
//! weights of `LogitLossConfig` and averages over the batch;
//! `feature_loss` applies the feature term to one block's feature map with
//! the MSE averaged over all elements and (1 − cos) over the rows.
//! Log-softmax is computed in f64 so a NaN or infinite logit makes the loss
//! NaN (the training loop stops on it) instead of being clamped away.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::backend::LogitLossConfig;
    use crate::ops::testing::{fd_check, random};

    const B: usize = 3;
    const C: usize = 7;

    fn value(s: &[f32], t: &[f32], labels: &[u32], cfg: &LogitLossConfig) -> f64 {
        let (mut ds, mut loss) = (vec![0.0; B * C], vec![0.0]);
        logit_loss(&mut ds, &mut loss, s, Some(t), labels, B, C, cfg, 1.0);
        loss[0] as f64
    }

    fn check(cfg: LogitLossConfig) {
        let (s, t) = (random(B * C, 1), random(B * C, 2));
        let labels = [2u32, 0, 6];
        let (mut ds, mut loss) = (vec![0.0; B * C], vec![0.0]);
        logit_loss(&mut ds, &mut loss, &s, Some(&t), &labels, B, C, &cfg, 1.0);
        fd_check(&format!("{cfg:?}"), &s, &ds, B * C, |s| value(s, &t, &labels, &cfg));
    }

    fn cfg(ce: f32, ls: f32, kd: f32, temp: f32, feature: f32) -> LogitLossConfig {
        LogitLossConfig { ce_weight: ce, label_smoothing: ls, kd_weight: kd, temperature: temp, feature_weight: feature }
    }

    #[test]
    fn each_term_and_their_sum_match_finite_differences() {
        check(cfg(1.0, 0.0, 0.0, 1.0, 0.0));
        check(cfg(1.0, 0.1, 0.0, 1.0, 0.0));
        check(cfg(0.0, 0.0, 1.0, 4.0, 0.0));
        check(cfg(0.0, 0.0, 0.0, 1.0, 1.0));
        check(cfg(0.5, 0.1, 0.5, 2.0, 0.3));
    }

    #[test]
    fn values_match_the_definitions() {
        // One sample, logits (0, ln 3): softmax = (1/4, 3/4).
        let s = [0.0f32, 3f32.ln()];
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(&mut ds, &mut loss, &s, None, &[1], 1, 2, &cfg(1.0, 0.0, 0.0, 1.0, 0.0), 1.0);
        assert!((loss[0] as f64 - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        // KD of identical logits is zero; of (0,0) vs (0, ln 3) at T=1 it is KL((1/4,3/4) || (1/2,1/2)).
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(&mut ds, &mut loss, &[0.0, 0.0], Some(&s), &[0], 1, 2, &cfg(0.0, 0.0, 1.0, 1.0, 0.0), 1.0);
        let kl = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((loss[0] as f64 - kl).abs() < 1e-6);
        // Feature term of s = 2t: MSE = mean(t²), cos = 1.
        let t = [1.0f32, 2.0];
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(&mut ds, &mut loss, &[2.0, 4.0], Some(&t), &[0], 1, 2, &cfg(0.0, 0.0, 0.0, 1.0, 1.0), 1.0);
        assert!((loss[0] - 2.5).abs() < 1e-6, "{}", loss[0]);
    }

    #[test]
    fn a_nan_logit_gives_a_nan_loss() {
        let (mut ds, mut loss) = (vec![0.0; 2], vec![0.0]);
        logit_loss(&mut ds, &mut loss, &[f32::NAN, 0.0], None, &[0], 1, 2, &cfg(1.0, 0.0, 0.0, 1.0, 0.0), 1.0);
        assert!(loss[0].is_nan());
    }

    #[test]
    fn feature_loss_matches_finite_differences_and_adds() {
        let (rows, cols) = (4, 6);
        let (s, t) = (random(rows * cols, 1), random(rows * cols, 2));
        let mut ds = vec![1.0; rows * cols];
        let mut loss = vec![2.0];
        feature_loss(&mut ds, &mut loss, &s, &t, rows, cols, 0.7);
        let grad: Vec<f32> = ds.iter().map(|v| v - 1.0).collect();
        fd_check("feature", &s, &grad, 24, |s| {
            let (mut d, mut l) = (vec![0.0; rows * cols], vec![0.0]);
            feature_loss(&mut d, &mut l, s, &t, rows, cols, 0.7);
            l[0] as f64
        });
        assert!(loss[0] > 2.0);
    }
}
