//! What the whole-model CPU benches share (`cpu.rs`, `cpu_vs_pytorch.rs`).

use effrank_engine::backend::ImageTransform;
use effrank_engine::model::VitConfig;
use effrank_engine::rng::Rng;

/// A batch of random image bytes at the model's own size, random labels,
/// and the transform that feeds them to the model unchanged in size.
pub fn batch_bytes(cfg: &VitConfig, batch: usize) -> (Vec<u8>, Vec<u32>, ImageTransform) {
    let mut rng = Rng::new(1);
    let bytes = (0..batch * cfg.channels * cfg.image_size * cfg.image_size).map(|_| rng.below(256) as u8).collect();
    let labels = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    let t = ImageTransform { channels: 3, src_height: cfg.image_size, src_width: cfg.image_size, dst_size: cfg.image_size, mean: [0.5; 3], std: [0.5; 3] };
    (bytes, labels, t)
}
