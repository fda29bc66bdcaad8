//! Which side limits a run on an image folder: the decoder or the model?
//!
//! Prints one table: images/s that one thread decodes (`data::stream::
//! decode_into`: PNG or JPEG, 224 px, to 224 px RGB planes, what a streamed
//! folder does per image), and the model's training steps in images/s
//! (forward, backward, AdamW, cross-entropy, on the CPU, and on the GPU when
//! the binary has the `cuda` feature and finds one). A run streams at the
//! decode rate times the decoding threads (`data::stream::default_threads`,
//! every core), so it is loader-bound when that product is below the step
//! rate.
//!
//!     cargo bench --bench loader
//!     EFFRANK_LOADER_MODEL=vit-b32 EFFRANK_LOADER_BATCH=64 cargo bench --bench loader --features cuda
//!
//! Settings (environment): EFFRANK_LOADER_MODEL (vit-s32; a preset or a
//! JSON config), EFFRANK_LOADER_BATCH (32), EFFRANK_LOADER_ITERS (5 timed
//! steps after 1 warm-up, median), EFFRANK_LOADER_IMAGES (64 images decoded
//! per format). The images are a smooth pattern with noise, encoded by the
//! `image` crate (PNG default compression, JPEG quality 75); photographs
//! decode at a similar rate for JPEG and faster for PNG (they compress
//! better).

use anyhow::{Context, Result};
use effrank_engine::data::stream::{decode_into, default_threads};
use effrank_engine::device::cpu::on_worker_thread;
use effrank_engine::device::Cpu;
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::dense_ranks;
use effrank_engine::model::{Vit, VitConfig};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::ops::Backend;
use effrank_engine::options::ModelPaths;
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Batch, LossSpec, TeacherSignal, Trainer};
use std::time::Instant;

const SIDE: u32 = 224;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{key}={v} is not a valid value")),
        Err(_) => Ok(default),
    }
}

/// `n` encoded 224 px images of `format`.
fn encoded(n: usize, format: image::ImageFormat) -> Result<Vec<Vec<u8>>> {
    let mut rng = Rng::new(3);
    (0..n)
        .map(|k| {
            let img = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
                let base = (x + y + 7 * k as u32) as usize;
                let noise = rng.below(32);
                image::Rgb([
                    ((base + noise) % 256) as u8,
                    ((2 * base + noise) % 256) as u8,
                    ((3 * base + noise) % 256) as u8,
                ])
            });
            let mut out = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut out), format)?;
            Ok(out)
        })
        .collect()
}

/// Images/s that one thread decodes from `images`.
fn decode_rate(images: &[Vec<u8>]) -> Result<f64> {
    let mut out = vec![0u8; 3 * (SIDE * SIDE) as usize];
    let start = Instant::now();
    for bytes in images {
        decode_into(bytes, "bench image", SIDE as usize, &mut out)?;
    }
    Ok(images.len() as f64 / start.elapsed().as_secs_f64())
}

/// The model's training steps on `be`, in images/s (median of `iters`).
fn step_rate<B: Backend>(be: &B, cfg: &VitConfig, batch: usize, iters: usize) -> Result<f64> {
    let ranks = dense_ranks(cfg);
    let model = Vit::from_host(
        be,
        cfg,
        &ranks,
        &init_params(cfg, &ranks, 0),
        ModelPaths::default_of(be),
    )?;
    let mut trainer = Trainer::new(be, model, batch, AdamWConfig::default())?;
    let mut rng = Rng::new(1);
    let side = cfg.image_size;
    let bytes: Vec<u8> = (0..batch * 3 * side * side)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    let transform = ImageTransform {
        channels: 3,
        src_height: side,
        src_width: side,
        dst_size: side,
        mean: [0.5; 3],
        std: [0.5; 3],
        resize: None,
    };
    let mut times = Vec::new();
    for i in 0..=iters {
        let start = Instant::now();
        let stats = trainer.step(
            be,
            Batch {
                bytes: &bytes,
                labels: &labels,
                transform: &transform,
            },
            TeacherSignal::None,
            &LossSpec::ce(),
            1e-4,
        )?;
        // The loss on the host: the step has finished on the device.
        std::hint::black_box(stats.loss);
        if i > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(batch as f64 / times[times.len() / 2])
}

#[cfg(feature = "cuda")]
fn cuda_step_rate(cfg: &VitConfig, batch: usize, iters: usize) -> Result<Option<(String, f64)>> {
    use effrank_engine::device::cuda::{cuda_available, CudaOptions};
    use effrank_engine::device::{Cuda, Device, Precision};
    if !cuda_available() {
        return Ok(None);
    }
    let be = Cuda::with_options(0, Precision::Bf16, CudaOptions::default())?;
    Ok(Some((be.name(), step_rate(&be, cfg, batch, iters)?)))
}

#[cfg(not(feature = "cuda"))]
fn cuda_step_rate(_: &VitConfig, _: usize, _: usize) -> Result<Option<(String, f64)>> {
    Ok(None)
}

fn run() -> Result<()> {
    let model: String = env_or("EFFRANK_LOADER_MODEL", "vit-s32".to_string())?;
    let batch = env_or("EFFRANK_LOADER_BATCH", 32usize)?;
    let iters = env_or("EFFRANK_LOADER_ITERS", 5usize)?.max(1);
    let n = env_or("EFFRANK_LOADER_IMAGES", 64usize)?.max(1);
    let cfg =
        VitConfig::from_name_or_file(&model, 100).with_context(|| format!("model {model}"))?;
    let threads = default_threads();
    println!("decoding threads of a streamed run here: {threads}");
    println!("{:<44} {:>12}", "what", "images/s");
    for (name, format) in [
        ("PNG", image::ImageFormat::Png),
        ("JPEG", image::ImageFormat::Jpeg),
    ] {
        let rate = decode_rate(&encoded(n, format)?)?;
        println!(
            "{:<44} {:>12.0}",
            format!("decode {name} 224 px, 1 thread"),
            rate
        );
        println!(
            "{:<44} {:>12.0}",
            format!("decode {name} 224 px, {threads} threads (1 thread x {threads})"),
            rate * threads as f64
        );
    }
    let label = format!("train step {model} batch {batch}");
    let cpu = on_worker_thread(|| step_rate(&Cpu, &cfg, batch, iters))?;
    println!("{:<44} {:>12.1}", format!("{label}, cpu"), cpu);
    if let Some((device, rate)) = cuda_step_rate(&cfg, batch, iters)? {
        println!("{:<44} {:>12.0}", format!("{label}, {device}"), rate);
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("loader benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
