//! CPU benchmarks of whole-model work (criterion):
//! - a training step (forward, backward, AdamW) of the CIFAR-native model
//!   `vit-cifar` at batch 64, 100 classes;
//! - a forward pass (inference) of `vit-b32` at batch 8, 100 classes:
//!   `vit-b32_b8` is the engine's inference path (`Frozen::logits`, the last
//!   block after attention on the class-token rows only), and
//!   `vit-b32_b8_every_token` the full forward that training runs (every
//!   token through every block, as timm's forward computes it).
//!
//! Throughput is reported in images/s. `scripts/bench_pytorch_cpu.py` times
//! the same shapes in PyTorch at the same thread count, and
//! `benches/cpu_vs_pytorch.rs` runs both sides round by round (the
//! comparison to trust on a noisy machine); README.md has the numbers.
//! Threads: rayon uses every core unless RAYON_NUM_THREADS says otherwise;
//! each iteration runs on a rayon worker, as the command line does
//! (`on_worker_thread`).

mod common;

use common::{Forward, TrainStep};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use effrank_engine::device::cpu::on_worker_thread;
use std::time::Duration;

// Models are built inside `bench_function`, so a filtered-out bench costs nothing.

fn train_step_vit_cifar(c: &mut Criterion) {
    let batch = 64;
    let mut g = c.benchmark_group("cpu_train_step");
    g.throughput(Throughput::Elements(batch as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    g.bench_function("vit-cifar_b64", |b| {
        let mut step = TrainStep::vit_cifar(batch, true);
        b.iter(|| on_worker_thread(|| step.run()))
    });
    g.bench_function("vit-cifar_b64_every_token", |b| {
        let mut step = TrainStep::vit_cifar(batch, false);
        b.iter(|| on_worker_thread(|| step.run()))
    });
    g.finish();
}

fn forward_vit_b32(c: &mut Criterion) {
    let batch = 8;
    let mut g = c.benchmark_group("cpu_forward");
    g.throughput(Throughput::Elements(batch as u64))
        .sample_size(10)
        .measurement_time(Duration::from_secs(15));
    g.bench_function("vit-b32_b8", |b| {
        let mut forward = Forward::vit_b32(batch);
        b.iter(|| on_worker_thread(|| forward.inference()))
    });
    g.bench_function("vit-b32_b8_every_token", |b| {
        let mut forward = Forward::vit_b32(batch);
        b.iter(|| on_worker_thread(|| forward.every_token()))
    });
    g.finish();
}

criterion_group!(benches, train_step_vit_cifar, forward_vit_b32);
criterion_main!(benches);
