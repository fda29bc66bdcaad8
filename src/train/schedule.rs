//! Learning-rate schedule: linear warm-up, then cosine decay.
//!
//! ```text
//! step < warmup:  lr = base · (step + 1) / warmup
//! otherwise:      lr = min + (base - min) · ½ (1 + cos(π · (step - warmup) / (total - warmup)))
//! ```
//! Steps count from 0; the last step (`total - 1`) is just above `min`.

/// A cosine schedule with linear warm-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f32,
    pub min_lr: f32,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl CosineSchedule {
    /// The learning rate at `step` (0-based).
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.base_lr - self.min_lr) * cosine as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_min() {
        let s = CosineSchedule {
            base_lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 4,
            total_steps: 104,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert!((s.lr(4) - 1.0).abs() < 1e-6);
        assert!((s.lr(54) - 0.55).abs() < 1e-6, "halfway {}", s.lr(54));
        assert!((s.lr(104) - 0.1).abs() < 1e-6);
        for step in 4..104 {
            assert!(s.lr(step + 1) <= s.lr(step));
        }
    }

    #[test]
    fn no_warmup_starts_at_base() {
        let s = CosineSchedule {
            base_lr: 0.5,
            min_lr: 0.0,
            warmup_steps: 0,
            total_steps: 10,
        };
        assert_eq!(s.lr(0), 0.5);
    }
}
