//! The memory plan (`effrank_engine::memory`) against the buffers the code
//! allocates, and gradient accumulation against the whole batch.
//!
//! Allocations are counted per kind by the CPU device on the calling thread
//! (`device::cpu::allocated_on_this_thread`); the CPU plan must equal them
//! in bytes, part by part, and the CUDA bf16 plan must equal them with
//! CUDA's storage rule (activations at 2 bytes, the rest at 4) applied to
//! the kinds the code asked for.

use effrank_engine::device::cpu::{allocated_on_this_thread, Allocated};
use effrank_engine::device::{Cpu, Device, DeviceKind, Precision};
use effrank_engine::memory::{
    Gate, ModelShape, Part, Place, Plan, Storage, TeacherPlan, TrainingRun,
};
use effrank_engine::model::params::{dense_ranks, param_count, uniform_ranks, BlockLinear, Ranks};
use effrank_engine::model::{Family, Pool, Vit, VitConfig, VitParams};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::options::ModelPaths;
use effrank_engine::rng::Rng;
use effrank_engine::train::step::shards_for;
use effrank_engine::train::{AdamWConfig, Batch, Frozen, LossSpec, TeacherSignal, Trainer};
use std::path::Path;

const CPU: Storage = Storage {
    device: DeviceKind::Cpu,
    precision: Precision::F32,
};
const CUDA_BF16: Storage = Storage {
    device: DeviceKind::Cuda,
    precision: Precision::Bf16,
};

fn configs() -> Vec<VitConfig> {
    let small = VitConfig {
        image_size: 8,
        channels: 3,
        patch: 4,
        width: 8,
        depth: 2,
        heads: 2,
        mlp: 12,
        classes: 5,
        ln_eps: 1e-6,
        family: Default::default(),
    };
    let deeper = VitConfig {
        image_size: 16,
        patch: 4,
        width: 32,
        depth: 3,
        heads: 4,
        mlp: 48,
        classes: 7,
        ..small.clone()
    };
    // Wider than the batch-split limit: whole batches.
    let wide = VitConfig {
        width: 264,
        heads: 4,
        mlp: 64,
        depth: 1,
        ..deeper.clone()
    };
    // Families with buffers of their own: LayerScale's pre-scale outputs,
    // norm_pre's input, the distilled pair of heads, and the LayerNorm on
    // every token of class-and-mean pooling.
    let distilled = VitConfig {
        family: Family {
            dist_token: true,
            pool: Pool::Distilled,
            layer_scale: true,
            norm_pre: true,
            ..Family::default()
        },
        ..small.clone()
    };
    let class_and_mean = VitConfig {
        family: Family {
            registers: 2,
            pool: Pool::ClassAndMean,
            ..Family::default()
        },
        ..deeper.clone()
    };
    vec![small, deeper, wide, distilled, class_and_mean]
}

fn rank_sets(cfg: &VitConfig) -> Vec<Ranks> {
    let mut mixed = uniform_ranks(cfg, 3);
    mixed[cfg.depth - 1][BlockLinear::Fc1] = None;
    mixed[0][BlockLinear::Q] = Some(5);
    vec![dense_ranks(cfg), uniform_ranks(cfg, 2), mixed]
}

fn random_params(cfg: &VitConfig, ranks: &Ranks, seed: u64) -> VitParams<Vec<f32>> {
    let mut rng = Rng::new(seed);
    VitParams::build(cfg, ranks, |s| Ok::<_, ()>(rng.normal_vec(s.numel(), 0.3))).unwrap()
}

fn transform(cfg: &VitConfig) -> ImageTransform {
    ImageTransform {
        channels: 3,
        src_height: cfg.image_size,
        src_width: cfg.image_size,
        dst_size: cfg.image_size,
        mean: [0.5; 3],
        std: [0.25; 3],
        resize: None,
    }
}

/// The elements `f` allocates on this thread.
fn counted<T>(f: impl FnOnce() -> T) -> (T, Allocated) {
    let before = allocated_on_this_thread();
    let out = f();
    (out, allocated_on_this_thread().since(before))
}

/// Bytes of `a` as `s` stores them.
fn bytes(a: Allocated, s: Storage) -> u64 {
    let act = match s.device {
        DeviceKind::Cuda if s.precision == Precision::Bf16 => 2,
        _ => 4,
    };
    a.activation * act + (a.param + a.statistic) * 4
}

/// The plan's bytes of the parts named (by prefix).
fn planned(plan: &Plan, names: &[&str]) -> u64 {
    names.iter().map(|n| plan.bytes_of(n)).sum()
}

fn run<'a>(
    model: ModelShape<'a>,
    batch: usize,
    micro_batches: usize,
    shards: usize,
    loss: &LossSpec,
    teacher: TeacherPlan<'a>,
    storage: Storage,
) -> TrainingRun<'a> {
    TrainingRun {
        model,
        batch,
        micro_batches,
        shards,
        feature_loss: loss.needs_features(),
        teacher,
        storage,
        data_bytes: 0,
        image_bytes: 0,
        loaded_params: 0,
    }
}

/// Every part of a training run's plan that the device allocates equals
/// what the code allocates, for several shapes, ranks, batches,
/// micro-batches, losses (hard labels, KD with a live teacher, the feature
/// loss) and both storages.
#[test]
fn the_plan_equals_the_allocations() {
    let be = Cpu;
    let losses = [
        LossSpec::ce(),
        LossSpec::parse("kd", 0.5, 4.0, 0.0).unwrap(),
        LossSpec::parse("feature", 0.5, 4.0, 0.0).unwrap(),
    ];
    for cfg in configs() {
        let dense = dense_ranks(&cfg);
        for ranks in rank_sets(&cfg) {
            for (batch, micro_batches) in [(1usize, 1usize), (6, 1), (7, 3)] {
                for loss in &losses {
                    let paths = ModelPaths::default_of(&be);
                    let micro = batch.div_ceil(micro_batches);
                    let shards = shards_for(&paths, &cfg, micro);
                    let model = ModelShape {
                        cfg: &cfg,
                        ranks: &ranks,
                    };
                    let teacher_shape = ModelShape {
                        cfg: &cfg,
                        ranks: &dense,
                    };
                    let teacher = if loss.needs_teacher() {
                        TeacherPlan::Live(teacher_shape)
                    } else {
                        TeacherPlan::None
                    };
                    let what = format!(
                        "width {} ranks {:?} batch {batch}/{micro_batches} loss {loss:?}",
                        cfg.width,
                        ranks[0].values().collect::<Vec<_>>()
                    );

                    let (vit, weights) = counted(|| {
                        Vit::from_host(&be, &cfg, &ranks, &random_params(&cfg, &ranks, 1), paths)
                            .unwrap()
                    });
                    let (mut trainer, trainer_bufs) = counted(|| {
                        Trainer::with_accumulation(
                            &be,
                            vit,
                            batch,
                            micro_batches,
                            AdamWConfig::default(),
                        )
                        .unwrap()
                    });
                    assert_eq!(trainer.shards(), shards, "{what}");
                    let (mut frozen, teacher_bufs) = counted(|| {
                        loss.needs_teacher().then(|| {
                            let t = Vit::from_host(
                                &be,
                                &cfg,
                                &dense,
                                &random_params(&cfg, &dense, 2),
                                paths,
                            )
                            .unwrap();
                            Frozen::for_loss(&be, t, micro, loss).unwrap()
                        })
                    });
                    // A step allocates what its first use needs (the
                    // feature loss's gradients), and nothing after.
                    let mut rng = Rng::new(3);
                    let pixels: Vec<u8> = (0..batch * 3 * cfg.image_size * cfg.image_size)
                        .map(|_| rng.below(256) as u8)
                        .collect();
                    let labels: Vec<u32> =
                        (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
                    let tf = transform(&cfg);
                    let data = Batch {
                        bytes: &pixels,
                        labels: &labels,
                        transform: &tf,
                    };
                    let step = |trainer: &mut Trainer<Cpu>, frozen: &mut Option<Frozen<Cpu>>| {
                        let signal = match frozen.as_mut() {
                            Some(f) => TeacherSignal::Live(f),
                            None => TeacherSignal::None,
                        };
                        trainer.forward_backward(&be, data, signal, loss).unwrap();
                    };
                    let ((), first_step) = counted(|| step(&mut trainer, &mut frozen));
                    let ((), second_step) = counted(|| step(&mut trainer, &mut frozen));
                    assert_eq!(second_step, Allocated::default(), "{what}");

                    for storage in [CPU, CUDA_BF16] {
                        let plan = Plan::training(&run(
                            model,
                            batch,
                            micro_batches,
                            shards,
                            loss,
                            teacher,
                            storage,
                        ));
                        let on_device = |p: &Part| {
                            p.place == Place::Device || storage.device == DeviceKind::Cpu
                        };
                        assert_eq!(
                            bytes(weights, storage),
                            plan.bytes_of("student weights")
                                - plan.bytes_of("student weights' bf16"),
                            "{what} {storage:?}"
                        );
                        assert_eq!(
                            bytes(trainer_bufs, storage),
                            planned(
                                &plan,
                                &[
                                    "gradients",
                                    "AdamW moments",
                                    "activations",
                                    "backward scratch"
                                ]
                            ),
                            "{what} {storage:?}"
                        );
                        assert_eq!(
                            bytes(first_step, storage),
                            plan.bytes_of("feature-loss gradients"),
                            "{what} {storage:?}"
                        );
                        assert_eq!(
                            bytes(teacher_bufs, storage),
                            planned(&plan, &["teacher weights", "teacher activations"])
                                - plan.bytes_of("teacher weights' bf16"),
                            "{what} {storage:?}"
                        );
                        // Nothing on the device is left out of the parts
                        // checked above.
                        let device_parts: u64 = plan
                            .parts
                            .iter()
                            .filter(|p| on_device(p))
                            .filter(|p| !p.what.contains("bf16"))
                            .filter(|p| {
                                ![
                                    "saving the training state",
                                    "a batch's images",
                                    "checkpoints",
                                    "data",
                                    "runtime",
                                ]
                                .iter()
                                .any(|h| p.what.starts_with(h))
                            })
                            .map(|p| p.bytes)
                            .sum();
                        assert_eq!(
                            device_parts,
                            bytes(weights, storage)
                                + bytes(trainer_bufs, storage)
                                + bytes(first_step, storage)
                                + bytes(teacher_bufs, storage),
                            "{what} {storage:?}"
                        );
                    }
                }
            }
        }
    }
}

/// Inference models (eval, teacher logits) allocate what `Plan::frozen`
/// says, and far less than training activations at depth.
#[test]
fn the_inference_plan_equals_the_allocations() {
    let be = Cpu;
    let mut cfg = configs()[1].clone();
    cfg.depth = 6;
    let dense = dense_ranks(&cfg);
    let shape = ModelShape {
        cfg: &cfg,
        ranks: &dense,
    };
    for every_block in [false, true] {
        let (_frozen, allocated) = counted(|| {
            let vit = Vit::from_host(
                &be,
                &cfg,
                &dense,
                &random_params(&cfg, &dense, 4),
                ModelPaths::default_of(&be),
            )
            .unwrap();
            if every_block {
                Frozen::for_feature_loss(&be, vit, 5).unwrap()
            } else {
                Frozen::new(&be, vit, 5).unwrap()
            }
        });
        for storage in [CPU, CUDA_BF16] {
            let plan = Plan::frozen("model", shape, 5, every_block, &storage);
            assert_eq!(
                bytes(allocated, storage),
                plan.total(storage_place(storage)) - plan.bytes_of("model weights' bf16"),
                "every block {every_block}, {storage:?}"
            );
        }
    }
    let inference = Plan::frozen("m", shape, 5, false, &CPU).bytes_of("m activations");
    let training = Plan::frozen("m", shape, 5, true, &CPU).bytes_of("m activations");
    assert!(2 * inference < training, "{inference} vs {training}");
}

fn storage_place(s: Storage) -> Place {
    match s.device {
        DeviceKind::Cpu => Place::Host,
        DeviceKind::Cuda => Place::Device,
    }
}

/// CUDA's bf16 weight copies are half the matrices' fp32 bytes.
#[test]
fn the_cuda_plan_adds_bf16_copies_of_the_matrices() {
    let cfg = configs()[1].clone();
    let ranks = uniform_ranks(&cfg, 2);
    let shape = ModelShape {
        cfg: &cfg,
        ranks: &ranks,
    };
    let p = Plan::frozen("s", shape, 1, false, &CUDA_BF16);
    let matrices: usize = effrank_engine::model::params::param_specs(&cfg, &ranks)
        .iter()
        .filter(|s| s.shape.len() >= 2 && s.decay)
        .map(|s| s.numel())
        .sum();
    assert_eq!(p.bytes_of("s weights' bf16 copies"), 2 * matrices as u64);
    assert_eq!(
        p.bytes_of("s weights") - p.bytes_of("s weights' bf16"),
        4 * param_count(&cfg, &ranks) as u64
    );
    assert_eq!(
        Plan::frozen("s", shape, 1, false, &CPU).bytes_of("s weights' bf16"),
        0
    );
}

/// Gradient accumulation: N micro-batches give the whole batch's loss,
/// top-1 count and gradients up to fp32 rounding, for hard labels on the
/// class-token tail, cached teacher logits, a live teacher with the feature
/// loss, whole and split (sharded) micro-batches; and the weights after an
/// optimizer step agree likewise.
#[test]
fn micro_batches_give_the_whole_batchs_step() {
    let be = Cpu;
    let cfg = configs()[1].clone();
    let ranks = rank_sets(&cfg).pop().unwrap();
    let dense = dense_ranks(&cfg);
    let batch = 7;
    let mut rng = Rng::new(9);
    let pixels: Vec<u8> = (0..batch * 3 * cfg.image_size * cfg.image_size)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    let cached: Vec<f32> = rng.normal_vec(batch * cfg.classes, 2.0);
    let tf = transform(&cfg);
    let cases = [
        ("ce", LossSpec::ce(), false),
        (
            "kd cached",
            LossSpec::parse("kd", 0.5, 4.0, 0.0).unwrap(),
            true,
        ),
        (
            "feature live",
            LossSpec::parse("kd=1,feature=0.5", 0.5, 4.0, 0.0).unwrap(),
            false,
        ),
    ];
    for (name, loss, use_cache) in &cases {
        for batch_split in [true, false] {
            let run = |micro_batches: usize| {
                let mut paths = ModelPaths::default_of(&be);
                paths.batch_split = batch_split;
                let vit = Vit::from_host(&be, &cfg, &ranks, &random_params(&cfg, &ranks, 5), paths)
                    .unwrap();
                let mut trainer = Trainer::with_accumulation(
                    &be,
                    vit,
                    batch,
                    micro_batches,
                    AdamWConfig::default(),
                )
                .unwrap();
                let mut teacher = Frozen::for_loss(
                    &be,
                    Vit::from_host(&be, &cfg, &dense, &random_params(&cfg, &dense, 6), paths)
                        .unwrap(),
                    batch.div_ceil(micro_batches),
                    loss,
                )
                .unwrap();
                let signal = if *use_cache {
                    TeacherSignal::Cached(&cached)
                } else if loss.needs_teacher() {
                    TeacherSignal::Live(&mut teacher)
                } else {
                    TeacherSignal::None
                };
                let data = Batch {
                    bytes: &pixels,
                    labels: &labels,
                    transform: &tf,
                };
                let stats = trainer.forward_backward(&be, data, signal, loss).unwrap();
                let grads: Vec<f32> = trainer
                    .grads
                    .tensors()
                    .iter()
                    .flat_map(|g| be.download(g).unwrap())
                    .collect();
                trainer
                    .opt
                    .update(&be, &mut trainer.model, &trainer.grads, 1e-3)
                    .unwrap();
                let weights: Vec<f32> = trainer
                    .model
                    .to_host(&be)
                    .unwrap()
                    .tensors()
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                (stats, grads, weights)
            };
            let (whole, g1, w1) = run(1);
            for micro_batches in [2, 3, 7] {
                let what =
                    format!("{name}, batch split {batch_split}, {micro_batches} micro-batches");
                let (acc, g, w) = run(micro_batches);
                assert!(
                    (acc.loss - whole.loss).abs() <= 1e-5 * whole.loss.abs(),
                    "{what}: loss {} vs {}",
                    acc.loss,
                    whole.loss
                );
                assert_eq!(acc.correct, whole.correct, "{what}");
                let scale = g1.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 1e-3, "{what}: gradients too small to compare");
                for (i, (a, b)) in g.iter().zip(&g1).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-5 * scale,
                        "{what}: gradient {i}: {a} vs {b}"
                    );
                }
                // AdamW's first step moves each weight by lr·g/(|g| + ε)
                // (and decays it): where the gradient stands well above its
                // rounding, the weights agree to fp32 rounding; where it is
                // ~0 its sign is rounding, and the weight moves at most lr.
                let lr = 1e-3f32;
                for (i, ((a, b), gi)) in w.iter().zip(&w1).zip(&g1).enumerate() {
                    let tol = if gi.abs() > 1e-3 * scale {
                        1e-6 * b.abs() + 1e-3 * lr
                    } else {
                        2.0 * lr
                    };
                    assert!(
                        (a - b).abs() <= tol,
                        "{what}: weight {i}: {a} vs {b} (gradient {gi})"
                    );
                }
            }
        }
    }
}

/// The gate lets students start while their plans fit beside the others'
/// and makes the next one wait until one ends; a student larger than the
/// whole room is an error, not a wait.
#[test]
fn students_wait_for_room() {
    let plan = |host: u64| Plan {
        parts: vec![Part {
            what: "student".into(),
            place: Place::Host,
            bytes: host,
        }],
    };
    let gate = Gate::new(Some(250), None);
    assert_eq!(gate.how_many(&plan(100)), 2);
    assert_eq!(gate.how_many(&plan(300)), 0);
    assert!(gate
        .reserve(&plan(300))
        .unwrap_err()
        .to_string()
        .contains("not enough memory for one student"));
    let first = gate.reserve(&plan(100)).unwrap();
    let second = gate.reserve(&plan(100)).unwrap();
    let started = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let r = gate.reserve(&plan(100)).unwrap();
            started.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(r);
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !started.load(std::sync::atomic::Ordering::SeqCst),
            "a third student started without room"
        );
        drop(first);
        waiter.join().unwrap();
        assert!(started.load(std::sync::atomic::Ordering::SeqCst));
    });
    drop(second);
    assert_eq!(gate.how_many(&plan(50)), 5);
}

// ---- The plan at the command line -------------------------------------

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");

fn engine(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Bytes of a size as `memory::human` prints it ("1.36 GiB", "12.3 MiB").
fn parse_human(s: &str) -> u64 {
    let (n, unit) = s.trim().split_once(' ').expect("a number and a unit");
    let n: f64 = n.parse().expect("a number");
    let scale = match unit {
        "GiB" => 1u64 << 30,
        "MiB" => 1 << 20,
        "KiB" => 1 << 10,
        other => panic!("unit {other}"),
    };
    (n * scale as f64) as u64
}

/// The host total a `--dry-run` printed.
fn dry_run_total(out: &str) -> u64 {
    let line = out
        .lines()
        .skip_while(|l| !l.contains("host memory:"))
        .find(|l| l.trim_start().starts_with("total"))
        .unwrap_or_else(|| panic!("no host total in:\n{out}"));
    parse_human(line.trim_start().trim_start_matches("total"))
}

/// `train` on the built-in data: the demo model, 64 images.
fn train_args<'a>(out: &'a str, batch: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--model",
        "vit-demo",
        "--data",
        "demo",
        "--demo-images",
        "64",
        "--epochs",
        "1",
        "--batch",
        batch,
        "--out",
        out,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn a_run_that_does_not_fit_is_refused_with_the_largest_batch_that_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run = run.to_str().unwrap();
    let plan_of = |batch: usize, limit: &str| {
        let b = batch.to_string();
        let out = engine(&train_args(
            run,
            &b,
            &["--dry-run", "--memory-limit", limit],
        ));
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    // --dry-run prints the plan and writes nothing.
    let (one, all) = (plan_of(1, "64G"), plan_of(64, "64G"));
    assert!(
        all.contains("memory plan: batch 64") && all.contains("fits"),
        "{all}"
    );
    assert!(!Path::new(run).exists(), "--dry-run wrote {run}");
    let (one, all) = (dry_run_total(&one), dry_run_total(&all));
    assert!(one < all, "a batch of 1 plans {one} bytes, of 64 {all}");

    // A limit between the two: refused, with a batch that fits named.
    let limit = ((one + all) / 2).to_string();
    let out = engine(&train_args(run, "64", &["--memory-limit", &limit]));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("not enough memory"), "{said}");
    assert!(!Path::new(run).exists(), "a refused run wrote {run}");
    let largest: usize = said
        .split("the largest batch that fits is ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no largest batch in:\n{said}"));
    assert!((1..64).contains(&largest), "{said}");
    assert!(said.contains("--accumulate"), "{said}");
    // ... and it is the largest: one more image does not fit.
    assert!(plan_of(largest, &limit).contains("\nfits"));
    assert!(plan_of(largest + 1, &limit).contains("does not fit"));

    // A limit below what the runtime itself needs names no batch.
    let out = engine(&train_args(run, "64", &["--memory-limit", "1M"]));
    let said = text(&out);
    assert!(!out.status.success());
    assert!(
        said.contains("not even a batch of one image fits"),
        "{said}"
    );
}

#[test]
fn accumulation_is_chosen_under_a_limit_and_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run = run.to_str().unwrap();
    let total = |batch: &str| {
        let out = engine(&train_args(run, batch, &["--dry-run"]));
        dry_run_total(&text(&out))
    };
    let (eight, all) = (total("8"), total("64"));
    let limit = ((eight + all) / 2).to_string();
    let out = engine(&train_args(
        run,
        "64",
        &["--memory-limit", &limit, "--accumulate", "auto"],
    ));
    assert!(out.status.success(), "{}", text(&out));
    let model = Path::new(run).join("model.safetensors");
    let meta = effrank_engine::provenance::RunMeta::from_metadata(
        &effrank_engine::model::checkpoint::read_metadata(&model).unwrap(),
        &model,
    )
    .unwrap()
    .unwrap();
    let fit = meta.fit.unwrap();
    assert_eq!(fit.batch, 64);
    assert!(
        (2..=8).contains(&fit.micro_batches),
        "micro-batches {}",
        fit.micro_batches
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(run).join("summary.json")).unwrap())
            .unwrap();
    assert!(summary["peak_host_bytes"].as_u64().unwrap() > 0);
}

/// The plan against the process's measured peak (VmHWM) for a model large
/// enough that its buffers, not the program, dominate: the plan is an
/// upper bound within 15% (the margin the README states), and not a
/// loose one (the peak is at least 70% of it).
#[test]
fn the_plan_is_within_its_margin_of_the_measured_peak() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let run = run.to_str().unwrap();
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "train",
            "--model",
            "vit-s32",
            "--data",
            "demo",
            "--demo-images",
            "64",
            "--epochs",
            "1",
            "--batch",
            "32",
            "--out",
            run,
        ];
        a.extend_from_slice(extra);
        a
    };
    let plan = dry_run_total(&text(&engine(&args(&["--dry-run"]))));
    let out = engine(&args(&["--quiet"]));
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(run).join("summary.json")).unwrap())
            .unwrap();
    let Some(peak) = summary["peak_host_bytes"].as_u64() else {
        eprintln!("no peak recorded (no /proc/self/status): skipped");
        return;
    };
    let ratio = peak as f64 / plan as f64;
    eprintln!("plan {plan} bytes, measured peak {peak} bytes, ratio {ratio:.3}");
    assert!((0.7..=1.15).contains(&ratio), "peak/plan {ratio:.3}");
}

#[test]
fn parallel_auto_starts_no_more_students_than_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher_run = tmp.path().join("teacher");
    let teacher_run = teacher_run.to_str().unwrap();
    let out = engine(&train_args(teacher_run, "32", &[]));
    assert!(out.status.success(), "{}", text(&out));
    let teacher = Path::new(teacher_run).join("model.safetensors");
    let sweep = tmp.path().join("sweep");
    let at_once = |limit: &str| {
        let out = std::process::Command::new(BIN)
            .env("RAYON_NUM_THREADS", "2")
            .args([
                "sweep",
                "--teacher",
                teacher.to_str().unwrap(),
                "--data",
                "demo",
                "--demo-images",
                "64",
                "--ranks",
                "1,2",
                "--epochs",
                "1",
                "--parallel",
                "auto",
                "--dry-run",
                "--memory-limit",
                limit,
                "--out",
                sweep.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let said = text(&out);
        assert!(out.status.success(), "{said}");
        let line = said
            .lines()
            .find(|l| l.starts_with("students at once: "))
            .unwrap_or_else(|| panic!("no students line in:\n{said}"))
            .to_string();
        let students: usize = line["students at once: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let size = |after: &str, before: &str| {
            parse_human(
                line.split(after)
                    .nth(1)
                    .unwrap()
                    .split(before)
                    .next()
                    .unwrap(),
            )
        };
        let each = size("each student up to ", ", beside");
        let shared = size(", beside ", " they share");
        (students, each, shared)
    };
    let (two, each, shared) = at_once("64G");
    assert_eq!(two, 2, "two threads, two ranks, memory to spare");
    assert!(each > 0 && shared > 0);
    let room_for = |k: f64| (shared + (k * each as f64) as u64).to_string();
    assert_eq!(at_once(&room_for(1.5)).0, 1);
    assert_eq!(at_once(&room_for(2.5)).0, 2);
    assert!(!sweep.join("results.jsonl").exists(), "--dry-run trained");
}

/// An inference pass allocates for inference: evaluating ViT-B/32 (350 MB
/// of weights) stays under 1.5 GiB resident, where training-sized
/// buffers took 5.2 GB.
#[test]
fn evaluating_vit_b32_stays_under_its_inference_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = VitConfig::preset("vit-b32", 10).unwrap();
    let ranks = dense_ranks(&cfg);
    let model = tmp.path().join("vit-b32.safetensors");
    effrank_engine::model::checkpoint::save_checkpoint(
        &model,
        &cfg,
        &ranks,
        &random_params(&cfg, &ranks, 3),
        &Default::default(),
    )
    .unwrap();
    let out = engine(&[
        "eval",
        "--checkpoint",
        model.to_str().unwrap(),
        "--data",
        "demo",
        "--demo-images",
        "16",
        "--normalize",
        "imagenet",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let Some(peak) = result["peak_host_bytes"].as_u64() else {
        eprintln!("no peak recorded (no /proc/self/status): skipped");
        return;
    };
    eprintln!("eval of ViT-B/32: peak {peak} bytes");
    assert!(peak < 3 << 29, "peak {peak} bytes");
}
