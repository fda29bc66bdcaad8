//! CPU benchmarks of whole-model work (criterion):
//! - a training step (forward, backward, AdamW) of the CIFAR-native model
//!   `vit-cifar` at batch 64, 100 classes;
//! - a forward pass (inference) of `vit-b32` at batch 8, 100 classes.
//!
//! Throughput is reported in images/s. `scripts/bench_pytorch_cpu.py` times
//! the same shapes in PyTorch at the same thread count; README.md has both.
//! Threads: rayon uses every core unless RAYON_NUM_THREADS says otherwise;
//! each iteration runs on a rayon worker, as the command line does
//! (`on_worker_thread`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use effrank_engine::backend::cpu::on_worker_thread;
use effrank_engine::backend::{CpuBackend, ImageTransform};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::dense_ranks;
use effrank_engine::model::{Vit, VitConfig};
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Frozen, Learner, LossSpec, TeacherSignal};
use std::time::Duration;

fn batch_bytes(cfg: &VitConfig, batch: usize) -> (Vec<u8>, Vec<u32>, ImageTransform) {
    let mut rng = Rng::new(1);
    let bytes = (0..batch * cfg.channels * cfg.image_size * cfg.image_size).map(|_| rng.below(256) as u8).collect();
    let labels = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    let t = ImageTransform { channels: 3, src_height: cfg.image_size, src_width: cfg.image_size, dst_size: cfg.image_size, mean: [0.5; 3], std: [0.5; 3] };
    (bytes, labels, t)
}

// Models are built inside `bench_function`, so a filtered-out bench costs nothing.

fn train_step_vit_cifar(c: &mut Criterion) {
    let batch = 64;
    let mut g = c.benchmark_group("cpu_train_step");
    g.throughput(Throughput::Elements(batch as u64)).sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("vit-cifar_b64", |b| {
        let be = CpuBackend;
        let cfg = VitConfig::preset("vit-cifar", 100).unwrap();
        let ranks = dense_ranks(&cfg);
        let model = Vit::from_host(&be, &cfg, &ranks, &init_params(&cfg, &ranks, 0)).unwrap();
        let mut learner = Learner::new(&be, model, batch, AdamWConfig::default()).unwrap();
        let (bytes, labels, t) = batch_bytes(&cfg, batch);
        let loss = LossSpec::ce();
        b.iter(|| on_worker_thread(|| learner.step(&be, &bytes, &labels, &t, TeacherSignal::None, &loss, 1e-4).unwrap()))
    });
    g.finish();
}

fn forward_vit_b32(c: &mut Criterion) {
    let batch = 8;
    let mut g = c.benchmark_group("cpu_forward");
    g.throughput(Throughput::Elements(batch as u64)).sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("vit-b32_b8", |b| {
        let be = CpuBackend;
        let cfg = VitConfig::preset("vit-b32", 100).unwrap();
        let ranks = dense_ranks(&cfg);
        let model = Vit::from_host(&be, &cfg, &ranks, &init_params(&cfg, &ranks, 0)).unwrap();
        let mut frozen = Frozen::new(&be, model, batch).unwrap();
        let (bytes, _, t) = batch_bytes(&cfg, batch);
        b.iter(|| on_worker_thread(|| frozen.logits(&be, &bytes, batch, &t).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, train_step_vit_cifar, forward_vit_b32);
criterion_main!(benches);
