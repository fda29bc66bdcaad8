//! Whole-step GPU benchmark at ViT-B/32 (224 px, 100 classes, random data):
//!
//! 1. Headline (plain timing, no profiling): images/s and model TFLOP/s of a
//!    teacher training step (dense forward, backward, AdamW), teacher
//!    inference, and a distillation step (KD loss) at ranks 16, 32, 64, 128
//!    with the teacher run live and with cached teacher logits; on the
//!    default paths and with every path that is off by default switched on
//!    (`ComputeOptions::every_path`), with the ratio.
//! 2. Ceilings of this run: a device-to-device copy (bytes read + written per
//!    second) and an 8192³ matrix product in the device's precision.
//! 3. Per-op breakdown (a separate pass on a profiling device,
//!    `CudaOptions::profile`): for each step, each op's device time, share of
//!    the step, bytes and FLOPs, achieved GB/s and TFLOP/s and fraction of
//!    the roofline against the ceilings of 2 (`perf::breakdown`).
//! 4. The reference protocol (`docs/method.md`: teacher 20 epochs at
//!    batch 32, then 16 ranks × 200 epochs at batch 24 with the feature loss
//!    and a live teacher, on 50,000 CIFAR images upsampled from 32 px):
//!    those steps measured at a few ranks, projected to GPU-hours
//!    (`perf::project`; rates between measured ranks interpolated).
//!
//! `scripts/bench_pytorch_gpu.py` times the steps of 1 in PyTorch (eager and
//! torch.compile) for the ratio.
//!
//!     cargo bench --bench step       # needs a CUDA GPU; says so and exits 0 without one
//!
//! Settings (environment): EFFRANK_STEP_BATCH (256), EFFRANK_STEP_RANKS
//! (16,32,64,128), EFFRANK_STEP_PRECISIONS (bf16,fp32; the breakdown and the
//! protocol run in bf16 only), EFFRANK_STEP_ITERS (10 timed steps after 3
//! warm-up steps, median; each step ends with a `download` of the loss, its
//! only synchronization), EFFRANK_STEP_PROFILE=0 to skip 2-4.

use anyhow::{anyhow, Context, Result};
use effrank_engine::device::cuda::{cuda_available, CudaOptions};
use effrank_engine::device::{BufKind, Cuda, Device, Precision};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::{dense_ranks, uniform_ranks, Ranks};
use effrank_engine::model::{Vit, VitConfig, VitParams};
use effrank_engine::ops;
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::options::{ComputeOptions, DeviceKind, ModelPaths};
use effrank_engine::perf::{breakdown, format_breakdown, interpolate, project, Ceilings, Protocol};
use effrank_engine::rng::Rng;
use effrank_engine::train::{self, AdamWConfig, Frozen, LossSpec, TeacherSignal, Trainer};
use std::collections::BTreeMap;
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

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> Result<T> {
    match std::env::var(var) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{var}={v} is not a valid value")),
        Err(_) => Ok(default),
    }
}

fn env_list<T: std::str::FromStr>(var: &str, default: &str) -> Result<Vec<T>> {
    let text = std::env::var(var).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| anyhow!("{var}: '{p}' is not a valid value"))
        })
        .collect()
}

/// One batch of random image bytes and labels, and its transform.
struct Batch {
    bytes: Vec<u8>,
    labels: Vec<u32>,
    transform: ImageTransform,
}

impl Batch {
    /// The batch as a training step takes it.
    fn view(&self) -> train::Batch<'_> {
        train::Batch {
            bytes: &self.bytes,
            labels: &self.labels,
            transform: &self.transform,
        }
    }

    /// `batch` images of `src` px, upsampled to 224.
    fn new(batch: usize, src: usize) -> Self {
        let mut rng = Rng::new(0);
        let bytes = (0..batch * 3 * src * src)
            .map(|_| rng.below(256) as u8)
            .collect();
        let labels = (0..batch).map(|_| rng.below(100) as u32).collect();
        Batch {
            bytes,
            labels,
            transform: ImageTransform {
                channels: 3,
                src_height: src,
                src_width: src,
                dst_size: 224,
                mean: [0.5; 3],
                std: [0.5; 3],
                resize: None,
            },
        }
    }
    fn len(&self) -> usize {
        self.labels.len()
    }
}

/// Host parameters made once and uploaded for every device.
struct Hosts {
    cfg: VitConfig,
    teacher: VitParams<Vec<f32>>,
    students: BTreeMap<usize, VitParams<Vec<f32>>>,
}

impl Hosts {
    fn new(ranks: &[usize]) -> Result<Self> {
        let cfg = VitConfig::preset("vit-b32", 100)?;
        let teacher = init_params(&cfg, &dense_ranks(&cfg), 0);
        let students = ranks
            .iter()
            .map(|&r| (r, init_params(&cfg, &uniform_ranks(&cfg, r), 1)))
            .collect();
        Ok(Hosts {
            cfg,
            teacher,
            students,
        })
    }
    fn student(&self, r: usize) -> Result<&VitParams<Vec<f32>>> {
        self.students
            .get(&r)
            .ok_or_else(|| anyhow!("no student parameters for rank {r}"))
    }
}

/// What to do with each step: gets its name, its model FLOPs and the step.
type Measure<'a> = dyn FnMut(&str, f64, &mut dyn FnMut() -> Result<()>) -> Result<()> + 'a;

/// The steps of the headline table at `batch`, each handed to `measure`.
fn headline_steps(
    gpu: &Opened,
    h: &Hosts,
    ranks: &[usize],
    data: &Batch,
    measure: &mut Measure,
) -> Result<()> {
    let be = &gpu.be;
    let (cfg, batch) = (&h.cfg, data.len());
    let dense = dense_ranks(cfg);
    let f_dense = forward_flops(cfg, &dense, batch);
    let ce = LossSpec::ce();
    {
        let mut trainer = Trainer::new(
            be,
            Vit::from_host(be, cfg, &dense, &h.teacher, gpu.paths)?,
            batch,
            AdamWConfig::default(),
        )?;
        measure("teacher train step", 3.0 * f_dense, &mut || {
            trainer
                .step(be, data.view(), TeacherSignal::None, &ce, 1e-4)
                .map(drop)
        })?;
    }
    let mut teacher = Frozen::new(
        be,
        Vit::from_host(be, cfg, &dense, &h.teacher, gpu.paths)?,
        batch,
    )?;
    measure("teacher inference", f_dense, &mut || {
        teacher
            .logits(be, &data.bytes, batch, &data.transform)
            .map(drop)
    })?;
    let cached = teacher.logits(be, &data.bytes, batch, &data.transform)?;
    let kd = LossSpec::parse("kd", 0.5, 4.0, 0.0)?;
    for &r in ranks {
        let sr = uniform_ranks(cfg, r);
        let f_student = forward_flops(cfg, &sr, batch);
        let mut student = Trainer::new(
            be,
            Vit::from_host(be, cfg, &sr, h.student(r)?, gpu.paths)?,
            batch,
            AdamWConfig::default(),
        )?;
        measure(
            &format!("distill r{r} (live teacher)"),
            f_dense + 3.0 * f_student,
            &mut || {
                student
                    .step(
                        be,
                        data.view(),
                        TeacherSignal::Live(&mut teacher),
                        &kd,
                        1e-4,
                    )
                    .map(drop)
            },
        )?;
        measure(
            &format!("distill r{r} (cached logits)"),
            3.0 * f_student,
            &mut || {
                student
                    .step(be, data.view(), TeacherSignal::Cached(&cached), &kd, 1e-4)
                    .map(drop)
            },
        )?;
    }
    Ok(())
}

/// The steps of the reference protocol: the teacher's training step and
/// inference at the teacher's batch, and at each rank a student's step with
/// the feature loss and the teacher run live, at the students' batch.
fn protocol_steps(
    gpu: &Opened,
    h: &Hosts,
    ranks: &[usize],
    p: &Protocol,
    measure: &mut Measure,
) -> Result<()> {
    let be = &gpu.be;
    let cfg = &h.cfg;
    let dense = dense_ranks(cfg);
    let (tdata, sdata) = (
        Batch::new(p.teacher_batch, 32),
        Batch::new(p.student_batch, 32),
    );
    {
        let mut trainer = Trainer::new(
            be,
            Vit::from_host(be, cfg, &dense, &h.teacher, gpu.paths)?,
            p.teacher_batch,
            AdamWConfig::default(),
        )?;
        measure(
            "protocol teacher step",
            3.0 * forward_flops(cfg, &dense, p.teacher_batch),
            &mut || {
                trainer
                    .step(be, tdata.view(), TeacherSignal::None, &LossSpec::ce(), 1e-4)
                    .map(drop)
            },
        )?;
    }
    let mut teacher = Frozen::new(
        be,
        Vit::from_host(be, cfg, &dense, &h.teacher, gpu.paths)?,
        p.teacher_batch.max(p.student_batch),
    )?;
    measure(
        "protocol inference",
        forward_flops(cfg, &dense, p.teacher_batch),
        &mut || {
            teacher
                .logits(be, &tdata.bytes, p.teacher_batch, &tdata.transform)
                .map(drop)
        },
    )?;
    let geometric = LossSpec::parse("feature", 0.5, 4.0, 0.0)?;
    for &r in ranks {
        let sr = uniform_ranks(cfg, r);
        let flops = forward_flops(cfg, &dense, p.student_batch)
            + 3.0 * forward_flops(cfg, &sr, p.student_batch);
        let mut student = Trainer::new(
            be,
            Vit::from_host(be, cfg, &sr, h.student(r)?, gpu.paths)?,
            p.student_batch,
            AdamWConfig::default(),
        )?;
        measure(&format!("protocol student r{r}"), flops, &mut || {
            student
                .step(
                    be,
                    sdata.view(),
                    TeacherSignal::Live(&mut teacher),
                    &geometric,
                    1e-4,
                )
                .map(drop)
        })?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median wall seconds of `step` over `iters` steps after 3 warm-up steps
/// (each step ends with a download, so the wall clock sees device time).
fn wall_seconds(iters: usize, step: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        step()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// Seconds per step of every step of `steps`, by name, in order.
type Timings = Vec<(String, f64, f64)>;

fn timed(iters: usize, steps: impl FnOnce(&mut Measure) -> Result<()>) -> Result<Timings> {
    let mut rows = Vec::new();
    steps(&mut |name, flops, step| {
        rows.push((name.to_string(), wall_seconds(iters, step)?, flops));
        Ok(())
    })?;
    Ok(rows)
}

/// A device and the paths its models take.
struct Opened {
    be: Cuda,
    paths: ModelPaths,
}

/// The GPU at `precision` with `options` (the default paths, or every
/// path that is off by default on), profiled or not.
fn open(precision: Precision, options: ComputeOptions, profile: bool) -> Result<Opened> {
    let paths = options.resolve(DeviceKind::Cuda);
    let cuda = CudaOptions {
        short_attention: paths.short_attention,
        profile,
    };
    Ok(Opened {
        be: Cuda::with_options(0, precision, cuda)?,
        paths: paths.model,
    })
}

/// `n` normal values: 16 Mi drawn once and repeated (random data for the
/// ceilings, which do not depend on the values beyond their not being zero,
/// at a fraction of the host time).
fn random_tiled(n: usize, seed: u64) -> Vec<f32> {
    let chunk = Rng::new(seed).normal_vec(n.min(16 << 20), 1.0);
    chunk.iter().copied().cycle().take(n).collect()
}

/// The ceilings of this run: a copy between two 512 MiB fp32 buffers of
/// random values, and an 8192³ product of random activations.
fn ceilings(be: &Cuda) -> Result<Ceilings> {
    let n = 128 << 20;
    let src = be.upload(&random_tiled(n, 3), BufKind::Param)?;
    let mut dst = be.alloc(n, BufKind::Param)?;
    let copy = be.median_device_seconds(10, || be.copy(&mut dst, &src, n))?;
    drop((src, dst));
    let m = 8192;
    let (a, b) = (
        be.upload(&random_tiled(m * m, 4), BufKind::Activation)?,
        be.upload(&random_tiled(m * m, 5), BufKind::Activation)?,
    );
    let mut c = be.alloc(m * m, BufKind::Activation)?;
    let gemm = be.median_device_seconds(10, || {
        ops::matmul::matmul(be, &mut c, &a, &b, ops::matmul::Gemm::new(m, m, m))
    })?;
    Ok(Ceilings {
        copy_bytes_per_s: 8.0 * n as f64 / copy,
        gemm_flops_per_s: 2.0 * (m as f64).powi(3) / gemm,
    })
}

/// Prints the per-op breakdown of every step of `steps` on the profiling device `be`.
fn print_breakdown(
    be: &Cuda,
    ceil: &Ceilings,
    steps: impl FnOnce(&mut Measure) -> Result<()>,
) -> Result<()> {
    const STEPS: usize = 3;
    steps(&mut |name, _flops, step| {
        for _ in 0..2 {
            step()?;
        }
        be.take_profile()?;
        let t = Instant::now();
        for _ in 0..STEPS {
            step()?;
        }
        let seconds = t.elapsed().as_secs_f64() / STEPS as f64;
        let table = be.take_profile()?;
        println!(
            "\n-- {name}: {:.2} ms per step (profiled; wall clock, {STEPS} steps)",
            seconds * 1e3
        );
        print!(
            "{}",
            format_breakdown(&breakdown(&table, STEPS, seconds, ceil))
        );
        Ok(())
    })
}

fn print_headline(batch: usize, default: &Timings, new: Option<&Timings>) {
    println!(
        "{:<32} {:>9} {:>10} {:>9} | {:>9} {:>10} {:>7}",
        "step", "ms", "images/s", "TFLOP/s", "new ms", "images/s", "ratio"
    );
    for (i, (name, s, flops)) in default.iter().enumerate() {
        let base = format!(
            "{name:<32} {:>9.2} {:>10.1} {:>9.1}",
            s * 1e3,
            batch as f64 / s,
            flops / s / 1e12
        );
        match new.and_then(|n| n.get(i)) {
            Some((_, ns, _)) => println!(
                "{base} | {:>9.2} {:>10.1} {:>6.2}x",
                ns * 1e3,
                batch as f64 / ns,
                s / ns
            ),
            None => println!("{base}"),
        }
    }
}

/// GPU-hours of the reference protocol from the protocol steps' timings.
fn print_projection(label: &str, p: &Protocol, rows: &Timings) -> Result<()> {
    let rate = |name: &str, batch: usize| {
        rows.iter()
            .find(|r| r.0 == name)
            .map(|r| batch as f64 / r.1)
            .with_context(|| format!("no '{name}' timing"))
    };
    let (teacher, eval) = (
        rate("protocol teacher step", p.teacher_batch)?,
        rate("protocol inference", p.teacher_batch)?,
    );
    let students: Vec<(usize, f64)> = rows
        .iter()
        .filter_map(|(n, s, _)| {
            n.strip_prefix("protocol student r")
                .and_then(|r| r.parse().ok())
                .map(|r| (r, p.student_batch as f64 / s))
        })
        .collect();
    let h = project(
        p,
        teacher,
        |r| interpolate(&students, r).unwrap_or(f64::NAN),
        eval,
    );
    let measured: Vec<String> = students
        .iter()
        .map(|(r, v)| format!("r{r} {v:.0}"))
        .collect();
    println!(
        "{label}: teacher {:.0} images/s (batch {}), students {} images/s (batch {}), eval {:.0} images/s -> teacher {:.2} h + students {:.2} h + eval {:.2} h = {:.2} GPU-hours",
        teacher,
        p.teacher_batch,
        measured.join(", "),
        p.student_batch,
        eval,
        h.teacher_hours,
        h.student_hours,
        h.eval_hours,
        h.total_hours()
    );
    Ok(())
}

fn run() -> Result<()> {
    if !cuda_available() {
        println!("no CUDA GPU: skipping the step benchmark");
        return Ok(());
    }
    let batch = env_or("EFFRANK_STEP_BATCH", 256usize)?;
    let iters = env_or("EFFRANK_STEP_ITERS", 10usize)?;
    let ranks: Vec<usize> = env_list("EFFRANK_STEP_RANKS", "16,32,64,128")?;
    let precisions: Vec<Precision> = env_list("EFFRANK_STEP_PRECISIONS", "bf16,fp32")?;
    let profile = env_or("EFFRANK_STEP_PROFILE", 1u8)? == 1;
    let protocol = Protocol::reference();
    let protocol_ranks = [16, 64, 256];
    let mut all_ranks = ranks.clone();
    all_ranks.extend(protocol_ranks);
    let hosts = Hosts::new(&all_ranks)?;
    let data = Batch::new(batch, 224);
    for precision in precisions {
        let be = open(precision, ComputeOptions::default(), false)?;
        println!(
            "\n== device: {}; ViT-B/32, batch {batch}, {iters} timed steps (median)",
            be.be.name()
        );
        let default = timed(iters, |m| headline_steps(&be, &hosts, &ranks, &data, m))?;
        drop(be);
        // New paths in bf16 (the fp32 device is the reference; its new paths are checked by the tests).
        let new = match precision {
            Precision::Bf16 => Some(timed(iters, |m| {
                headline_steps(
                    &open(precision, ComputeOptions::every_path(), false)?,
                    &hosts,
                    &ranks,
                    &data,
                    m,
                )
            })?),
            Precision::F32 => None,
        };
        println!(
            "headline (no profiling); 'new': every path that is off by default on ({:?})",
            ComputeOptions::every_path()
        );
        print_headline(batch, &default, new.as_ref());
        if !profile || precision != Precision::Bf16 {
            continue;
        }
        let ceil = ceilings(&open(precision, ComputeOptions::default(), false)?.be)?;
        println!(
            "\nceilings measured now: copy {:.0} GB/s (read + write), 8192³ GEMM {:.0} TFLOP/s",
            ceil.copy_bytes_per_s / 1e9,
            ceil.gemm_flops_per_s / 1e12
        );
        for (label, paths) in [
            ("default paths", ComputeOptions::default()),
            ("new paths", ComputeOptions::every_path()),
        ] {
            let be = open(precision, paths, true)?;
            println!("\n== per-op breakdown, {label}");
            print_breakdown(&be.be, &ceil, |m| {
                headline_steps(&be, &hosts, &ranks, &data, m)
            })?;
            drop(be);
            let rows = timed(iters, |m| {
                protocol_steps(
                    &open(precision, paths, false)?,
                    &hosts,
                    &protocol_ranks,
                    &protocol,
                    m,
                )
            })?;
            println!("\n== reference protocol, {label} (no profiling)");
            for (name, s, _) in &rows {
                println!("{name:<32} {:>9.2} ms", s * 1e3);
            }
            print_projection(&format!("projection, {label}"), &protocol, &rows)?;
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("step benchmark failed: {e:#}");
        std::process::exit(1);
    }
}
