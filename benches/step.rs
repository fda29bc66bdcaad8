//! Whole-step GPU benchmark at ViT-B/32 (issue "GPU performance"): images/s
//! and model FLOP/s of
//!   1. a teacher training step (dense forward, backward, AdamW),
//!   2. a distillation step at ranks 16, 32, 64, 128 with the teacher run
//!      live, and with cached teacher logits (student only),
//!   3. teacher inference,
//!
//! at 224 px, 100 classes, on random data. `scripts/bench_pytorch_gpu.py`
//! times the same steps in PyTorch (eager and torch.compile) for the ratio.
//!
//!     cargo bench --bench step                # needs a CUDA GPU; skips without one
//!     EFFRANK_STEP_BATCH=64 cargo bench --bench step
//!
//! Timing: 3 warm-up steps, then the median of 10, each closed by a
//! `download` of the loss (the only synchronization of a step).

use effrank_engine::ops::image::ImageTransform;
use effrank_engine::ops::Backend;
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::{dense_ranks, uniform_ranks, Ranks};
use effrank_engine::model::{Vit, VitConfig};
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Frozen, Learner, LossSpec, TeacherSignal};
use std::time::Instant;

/// Multiply-adds ×2 of one forward pass: every linear layer plus attention.
fn forward_flops(cfg: &VitConfig, ranks: &Ranks, batch: usize) -> f64 {
    let (t, d) = (cfg.tokens() as f64, cfg.width as f64);
    let rows = batch as f64 * t;
    let mut per_row = 0.0;
    for b in ranks {
        for (layer, r) in b.iter() {
            let (o, i) = layer.shape(cfg);
            per_row += match r {
                None => (o * i) as f64,
                Some(r) => (r * (o + i)) as f64,
            };
        }
    }
    let attention = cfg.depth as f64 * 2.0 * t * d;
    let patch = (cfg.n_patches() * cfg.patch_dim() * cfg.width) as f64 / t;
    2.0 * rows * (per_row + attention + patch)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(mut step: impl FnMut()) -> f64 {
    for _ in 0..3 {
        step();
    }
    median((0..10).map(|_| {
        let t = Instant::now();
        step();
        t.elapsed().as_secs_f64()
    }).collect())
}

fn report(name: &str, batch: usize, seconds: f64, flops: f64) {
    println!("{name:<34} {:9.2} ms {:10.1} images/s {:8.1} TFLOP/s", seconds * 1e3, batch as f64 / seconds, flops / seconds / 1e12);
}

fn run<B: Backend>(be: &B, batch: usize) {
    let cfg = VitConfig::preset("vit-b32", 100).unwrap();
    let mut rng = Rng::new(0);
    let bytes: Vec<u8> = (0..batch * 3 * 224 * 224).map(|_| rng.below(256) as u8).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(100) as u32).collect();
    let t = ImageTransform { channels: 3, src_height: 224, src_width: 224, dst_size: 224, mean: [0.5; 3], std: [0.5; 3], resize: None };
    let dense = dense_ranks(&cfg);
    let teacher_host = init_params(&cfg, &dense, 0);
    let f_dense = forward_flops(&cfg, &dense, batch);
    println!("device: {}; ViT-B/32, batch {batch}", be.name());

    let mut learner = Learner::new(be, Vit::from_host(be, &cfg, &dense, &teacher_host).unwrap(), batch, AdamWConfig::default()).unwrap();
    let ce = LossSpec::ce();
    let s = time(|| {
        learner.step(be, &bytes, &labels, &t, TeacherSignal::None, &ce, 1e-4).unwrap();
    });
    report("teacher train step", batch, s, 3.0 * f_dense);
    drop(learner);

    let mut teacher = Frozen::new(be, Vit::from_host(be, &cfg, &dense, &teacher_host).unwrap(), batch).unwrap();
    let s = time(|| {
        teacher.logits(be, &bytes, batch, &t).unwrap();
    });
    report("teacher inference", batch, s, f_dense);
    let cached = teacher.logits(be, &bytes, batch, &t).unwrap();

    let kd = LossSpec::parse("kd", 0.5, 4.0, 0.0).unwrap();
    for r in [16, 32, 64, 128] {
        let ranks = uniform_ranks(&cfg, r);
        let f_student = forward_flops(&cfg, &ranks, batch);
        let host = init_params(&cfg, &ranks, 1);
        let mut student = Learner::new(be, Vit::from_host(be, &cfg, &ranks, &host).unwrap(), batch, AdamWConfig::default()).unwrap();
        let s = time(|| {
            student.step(be, &bytes, &labels, &t, TeacherSignal::Live(&mut teacher), &kd, 1e-4).unwrap();
        });
        report(&format!("distill step r{r} (live teacher)"), batch, s, f_dense + 3.0 * f_student);
        let s = time(|| {
            student.step(be, &bytes, &labels, &t, TeacherSignal::Cached(&cached), &kd, 1e-4).unwrap();
        });
        report(&format!("distill step r{r} (cached logits)"), batch, s, 3.0 * f_student);
    }
}

#[cfg(feature = "cuda")]
fn main() {
    use effrank_engine::device::cuda::cuda_available;
    use effrank_engine::device::{Cuda, Precision};
    if !cuda_available() {
        println!("no CUDA GPU: skipping the step benchmark");
        return;
    }
    let batch = std::env::var("EFFRANK_STEP_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    // bf16 mixed precision (the engine's default on CUDA), then the fp32 reference path.
    for precision in [Precision::Bf16, Precision::F32] {
        match Cuda::with_precision(0, precision) {
            Ok(be) => run(&be, batch),
            Err(e) => println!("no usable CUDA GPU ({e:#}): skipping the step benchmark"),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("built without the cuda feature: skipping the step benchmark");
}
