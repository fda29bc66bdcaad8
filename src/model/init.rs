//! Fresh parameters for training from scratch (timm's ViT initialization).
//!
//! Weight matrices (patch embedding included), the position embedding and
//! the head: truncated normal, std 0.02, cut at ±2 std; class token: normal,
//! std 1e-6; biases 0; LayerNorm scale 1 and shift 0. A low-rank layer's U
//! and V are drawn so that U·V has the spread of a dense layer
//! (`factorize::random_factor_std`). Tensor `i` (in `param_specs` order)
//! draws from `Rng::from_keys(&[seed, i])`, so adding a layer does not change
//! the others.

use super::config::VitConfig;
use super::params::{param_specs, Ranks, VitParams};
use crate::factorize::random_factor_std;
use crate::rng::Rng;

const STD: f32 = 0.02;

pub fn init_params(cfg: &VitConfig, ranks: &Ranks, seed: u64) -> VitParams<Vec<f32>> {
    let specs = param_specs(cfg, ranks);
    let tensors = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut rng = Rng::from_keys(&[seed, i as u64]);
            let n = s.numel();
            let name = s.name.as_str();
            if name.ends_with(".U") || name.ends_with(".V") {
                let r = if name.ends_with(".U") { s.shape[1] } else { s.shape[0] };
                rng.normal_vec(n, random_factor_std(r))
            } else if name.ends_with("bias") {
                vec![0.0; n]
            } else if name.contains("norm") {
                vec![1.0; n]
            } else if name == "cls_token" {
                rng.normal_vec(n, 1e-6)
            } else {
                rng.trunc_normal_vec(n, STD)
            }
        })
        .collect();
    VitParams::from_tensors(cfg, ranks, tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{dense_ranks, uniform_ranks};

    #[test]
    fn norms_are_one_biases_zero_weights_small_and_seeded() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let p = init_params(&cfg, &dense_ranks(&cfg), 3);
        assert!(p.blocks[0].norm1_w.iter().all(|&v| v == 1.0));
        assert!(p.head.bias().iter().all(|&v| v == 0.0));
        let std = (p.pos.iter().map(|v| v * v).sum::<f32>() / p.pos.len() as f32).sqrt();
        assert!((std - 0.0176).abs() < 0.003, "trunc-normal(0.02) std {std}");
        assert_eq!(init_params(&cfg, &dense_ranks(&cfg), 3).pos, p.pos);
        assert_ne!(init_params(&cfg, &dense_ranks(&cfg), 4).pos, p.pos);
        let lr = init_params(&cfg, &uniform_ranks(&cfg, 8), 3);
        assert_eq!(lr.tensors().len(), param_specs(&cfg, &uniform_ranks(&cfg, 8)).len());
    }
}
