//! AdamW (Loshchilov & Hutter) with global-norm clipping, per element:
//!
//! ```text
//! g  = grad · min(1, max_norm / ‖grad‖_global)      (‖·‖² summed by sum_squares)
//! m  = β1 m + (1 − β1) g,      v = β2 v + (1 − β2) g²
//! p −= lr · (wd · p + (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + ε))
//! ```
//! The decay is decoupled from the gradient (PyTorch's `AdamW`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::backend::AdamWStep;

    fn hp(step: u32, clip: Option<f32>) -> AdamWStep {
        AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step, max_grad_norm: clip }
    }

    #[test]
    fn two_steps_match_a_hand_computation() {
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0f32], vec![0.0f32]);
        adamw_update(&mut p, &[0.5], &mut m, &mut v, 0.25, 1, &hp(1, None));
        // Step 1: m̂ = g, v̂ = g², update = g/|g| = 1; p = 1 − 0.1·(0.01 + 1).
        assert!((p[0] - 0.899).abs() < 1e-6, "{}", p[0]);
        adamw_update(&mut p, &[-0.5], &mut m, &mut v, 0.25, 1, &hp(2, None));
        let (m2, v2): (f64, f64) = (0.9 * 0.05 + 0.1 * -0.5, 0.999 * 0.00025 + 0.001 * 0.25);
        let (mh, vh) = (m2 / (1.0 - 0.81), v2 / (1.0 - 0.998_001));
        let want = 0.899 - 0.1 * (0.01 * 0.899 + mh / (vh.sqrt() + 1e-8));
        assert!((p[0] as f64 - want).abs() < 1e-5, "{} vs {want}", p[0]);
    }

    #[test]
    fn clipping_scales_the_gradient_by_the_global_norm() {
        assert_eq!(clip_scale(16.0, Some(1.0)), 0.25);
        assert_eq!(clip_scale(0.25, Some(1.0)), 1.0);
        assert_eq!(clip_scale(16.0, None), 1.0);
        // With clipping the first step's moment holds the clipped gradient.
        let (mut p, mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
        adamw_update(&mut p, &[3.0, 4.0], &mut m, &mut v, 25.0, 2, &hp(1, Some(1.0)));
        assert!((m[0] - 0.1 * 0.6).abs() < 1e-7 && (m[1] - 0.1 * 0.8).abs() < 1e-7);
        let mut acc = vec![1.0];
        sum_squares(&mut acc, &[3.0, 4.0], 2);
        assert_eq!(acc[0], 26.0);
    }
}
