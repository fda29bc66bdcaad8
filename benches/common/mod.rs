//! The whole-model CPU workloads, shared by `cpu.rs` (criterion, the engine
//! alone) and `cpu_vs_pytorch.rs` (paired with PyTorch), so that both time
//! exactly the same work.

use effrank_engine::device::{Cpu, Device};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::dense_ranks;
use effrank_engine::model::{Vit, VitConfig};
use effrank_engine::ops::image::{self, ImageTransform};
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Batch, Frozen, LossSpec, TeacherSignal, Trainer};

/// A batch of random image bytes at the model's own size, random labels,
/// and the transform that feeds them to the model unchanged in size.
fn batch_bytes(cfg: &VitConfig, batch: usize) -> (Vec<u8>, Vec<u32>, ImageTransform) {
    let mut rng = Rng::new(1);
    let bytes = (0..batch * cfg.channels * cfg.image_size * cfg.image_size)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    let t = ImageTransform {
        channels: 3,
        src_height: cfg.image_size,
        src_width: cfg.image_size,
        dst_size: cfg.image_size,
        mean: [0.5; 3],
        std: [0.5; 3],
        resize: None,
    };
    (bytes, labels, t)
}

/// A dense model of `preset` with 100 classes and seeded random weights.
fn dense_model(preset: &str) -> Vit<Cpu> {
    let cfg = VitConfig::preset(preset, 100).unwrap();
    let ranks = dense_ranks(&cfg);
    Vit::from_host(
        &Cpu,
        &cfg,
        &ranks,
        &init_params(&cfg, &ranks, 0),
        effrank_engine::options::ModelPaths::default_of(&Cpu),
    )
    .unwrap()
}

/// Training steps (forward, backward, AdamW; cross-entropy) of `vit-cifar`,
/// on the class-token tail (the CPU's default: the last block after
/// attention on the class-token rows, `model::vit`) or with every token
/// through every block, as timm computes it.
pub struct TrainStep {
    trainer: Trainer<Cpu>,
    bytes: Vec<u8>,
    labels: Vec<u32>,
    transform: ImageTransform,
}

impl TrainStep {
    pub fn vit_cifar(batch: usize, class_token_tail: bool) -> Self {
        let mut model = dense_model("vit-cifar");
        model.paths.class_token_tail = class_token_tail;
        let (bytes, labels, transform) = batch_bytes(&model.cfg, batch);
        let trainer = Trainer::new(&Cpu, model, batch, AdamWConfig::default()).unwrap();
        TrainStep {
            trainer,
            bytes,
            labels,
            transform,
        }
    }

    pub fn run(&mut self) {
        self.trainer
            .step(
                &Cpu,
                Batch {
                    bytes: &self.bytes,
                    labels: &self.labels,
                    transform: &self.transform,
                },
                TeacherSignal::None,
                &LossSpec::ce(),
                1e-4,
            )
            .unwrap();
    }
}

/// Forward passes of `vit-b32`, image bytes to logits on the host.
pub struct Forward {
    batch: usize,
    frozen: Frozen<Cpu>,
    bytes: Vec<u8>,
    transform: ImageTransform,
}

impl Forward {
    pub fn vit_b32(batch: usize) -> Self {
        let model = dense_model("vit-b32");
        let (bytes, _, transform) = batch_bytes(&model.cfg, batch);
        let frozen = Frozen::new(&Cpu, model, batch).unwrap();
        Forward {
            batch,
            frozen,
            bytes,
            transform,
        }
    }

    /// The engine's inference path (`Frozen::logits`: the last block after
    /// attention on the class-token rows only).
    pub fn inference(&mut self) -> Vec<f32> {
        self.frozen
            .logits(&Cpu, &self.bytes, self.batch, &self.transform)
            .unwrap()
    }

    /// The full forward that training runs: every token through every block,
    /// as timm computes it.
    pub fn every_token(&mut self) -> Vec<f32> {
        let (be, f) = (Cpu, &mut self.frozen);
        image::from_bytes(
            &be,
            &mut f.acts.images,
            &self.bytes,
            self.batch,
            &self.transform,
        )
        .unwrap();
        f.model.forward(&be, &mut f.acts, self.batch).unwrap();
        be.download(&f.acts.logits).unwrap()
    }
}
