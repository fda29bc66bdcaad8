//! Whole-model checks on the CPU reference: the hand-written backward of the
//! ViT (dense and low-rank, with every loss) against central finite
//! differences, and a full-rank SVD student against its dense teacher.
//!
//! Finite differences run on the fp32 engine itself: with step h = 3e-3
//! the truncation error (h² f''' / 6) and the rounding error (ε_f32 |L| / h ≈
//! 4e-5 for |L| ≈ 1) are both well under the tolerance of 2% relative
//! (+ 2e-4 absolute), while a wrong or missing term changes a gradient by
//! far more than that.

use effrank_engine::device::{Cpu, Device};
use effrank_engine::factorize::{factorize, FactorInit};
use effrank_engine::model::params::BlockLinear;
use effrank_engine::model::params::{dense_ranks, param_specs, uniform_ranks, Ranks};
use effrank_engine::model::{OutputGrads, Vit, VitConfig, VitParams};
use effrank_engine::ops::image::{self, ImageTransform};
use effrank_engine::rng::Rng;
use effrank_engine::train::{
    spare_threads, AdamWConfig, Batch, Frozen, LossSpec, TeacherSignal, Trainer,
};

fn tiny_config() -> VitConfig {
    VitConfig {
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
    }
}

/// Wide enough that products are split over threads.
fn wide_config() -> VitConfig {
    VitConfig {
        image_size: 16,
        channels: 3,
        patch: 4,
        width: 64,
        depth: 3,
        heads: 4,
        mlp: 160,
        classes: 7,
        ln_eps: 1e-6,
        family: Default::default(),
    }
}

fn random_params(cfg: &VitConfig, ranks: &Ranks, seed: u64) -> VitParams<Vec<f32>> {
    let mut rng = Rng::new(seed);
    VitParams::build(cfg, ranks, |s| {
        let v = if s.name.ends_with("norm1.weight")
            || s.name.ends_with("norm2.weight")
            || s.name == "norm.weight"
        {
            (0..s.numel())
                .map(|_| 1.0 + 0.3 * rng.normal() as f32)
                .collect()
        } else {
            rng.normal_vec(s.numel(), 0.4)
        };
        Ok::<_, ()>(v)
    })
    .unwrap()
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

struct Case {
    bytes: Vec<u8>,
    labels: Vec<u32>,
}

fn case(cfg: &VitConfig, batch: usize) -> Case {
    let mut rng = Rng::new(77);
    let bytes = (0..batch * 3 * cfg.image_size * cfg.image_size)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    Case { bytes, labels }
}

fn loss_of(
    be: &Cpu,
    trainer: &mut Trainer<Cpu>,
    teacher: &mut Frozen<Cpu>,
    c: &Case,
    loss: &LossSpec,
    cfg: &VitConfig,
) -> f32 {
    trainer
        .forward_backward(
            be,
            Batch {
                bytes: &c.bytes,
                labels: &c.labels,
                transform: &transform(cfg),
            },
            TeacherSignal::Live(teacher),
            loss,
        )
        .unwrap()
        .loss
}

/// The analytic gradients of `loss` against central finite differences, on
/// the path that runs every token and, where the loss reads only the logits,
/// on the class-token tail (`Vit::class_token_tail`), with the last block's
/// attention for the class token's query alone and for every token
/// (`Vit::class_token_query`).
fn check_gradients(ranks: Ranks, loss: LossSpec) {
    for (class_token_tail, class_token_query) in [(false, true), (true, true), (true, false)] {
        if class_token_tail && loss.needs_features() {
            continue;
        }
        check_gradients_on(ranks.clone(), &loss, class_token_tail, class_token_query);
    }
}

fn check_gradients_on(
    ranks: Ranks,
    loss: &LossSpec,
    class_token_tail: bool,
    class_token_query: bool,
) {
    let be = Cpu;
    let cfg = tiny_config();
    let mut student = Vit::from_host(
        &be,
        &cfg,
        &ranks,
        &random_params(&cfg, &ranks, 1),
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    student.paths.class_token_tail = class_token_tail;
    student.paths.class_token_query = class_token_query;
    let teacher_model = Vit::from_host(
        &be,
        &cfg,
        &dense_ranks(&cfg),
        &random_params(&cfg, &dense_ranks(&cfg), 2),
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    let mut teacher = Frozen::for_feature_loss(&be, teacher_model, 3).unwrap();
    let mut trainer = Trainer::new(&be, student, 3, AdamWConfig::default()).unwrap();
    let c = case(&cfg, 3);
    loss_of(&be, &mut trainer, &mut teacher, &c, loss, &cfg);
    let grads: Vec<Vec<f32>> = trainer
        .grads
        .tensors()
        .iter()
        .map(|g| be.download(g).unwrap())
        .collect();

    let h = 3e-3f32;
    let mut rng = Rng::new(5);
    let mut checked = 0;
    for (ti, spec) in param_specs(&cfg, &ranks).iter().enumerate() {
        let base = be.download(trainer.model.params.tensors()[ti]).unwrap();
        for _ in 0..4 {
            let i = rng.below(spec.numel());
            let mut p = base.clone();
            p[i] = base[i] + h;
            be.write(trainer.model.params.tensors_mut()[ti], &p)
                .unwrap();
            let up = loss_of(&be, &mut trainer, &mut teacher, &c, loss, &cfg);
            p[i] = base[i] - h;
            be.write(trainer.model.params.tensors_mut()[ti], &p)
                .unwrap();
            let down = loss_of(&be, &mut trainer, &mut teacher, &c, loss, &cfg);
            be.write(trainer.model.params.tensors_mut()[ti], &base)
                .unwrap();
            let numeric = (up - down) / (2.0 * h);
            let analytic = grads[ti][i];
            let tol = 2e-2 * numeric.abs().max(analytic.abs()) + 2e-4;
            assert!((numeric - analytic).abs() <= tol, "{}[{i}] (class-token tail {class_token_tail}, query {class_token_query}): analytic {analytic}, finite difference {numeric}", spec.name);
            checked += 1;
        }
    }
    assert!(checked > 50);
}

#[test]
fn dense_model_gradients_match_finite_differences_ce() {
    let cfg = tiny_config();
    check_gradients(
        dense_ranks(&cfg),
        LossSpec::parse("ce", 0.5, 4.0, 0.1).unwrap(),
    );
}

#[test]
fn lowrank_model_gradients_match_finite_differences_kd() {
    let cfg = tiny_config();
    check_gradients(
        uniform_ranks(&cfg, 3),
        LossSpec::parse("kd", 0.5, 2.0, 0.0).unwrap(),
    );
}

#[test]
fn mixed_model_gradients_match_finite_differences_all_losses() {
    let cfg = tiny_config();
    let mut ranks = uniform_ranks(&cfg, 2);
    ranks[0][BlockLinear::K] = None;
    ranks[1][BlockLinear::Fc1] = None;
    check_gradients(
        ranks,
        LossSpec::parse("kd=1,feature=1,ce=0.5", 0.3, 3.0, 0.0).unwrap(),
    );
}

#[test]
fn full_rank_svd_student_reproduces_the_teacher() {
    let be = Cpu;
    let cfg = tiny_config();
    let dense = dense_ranks(&cfg);
    let host = random_params(&cfg, &dense, 3);
    let (student_host, reports) =
        factorize(&cfg, &host, &uniform_ranks(&cfg, 8), FactorInit::Svd, None).unwrap();
    assert!(reports.iter().all(|r| r.rel_error < 1e-5));
    // fc1 is [12, 8] and fc2 [8, 12]: full rank is 8 for every layer.
    let c = case(&cfg, 4);
    let mut teacher = Frozen::new(
        &be,
        Vit::from_host(
            &be,
            &cfg,
            &dense,
            &host,
            effrank_engine::options::ModelPaths::default_of(&be),
        )
        .unwrap(),
        4,
    )
    .unwrap();
    let mut student = Frozen::new(
        &be,
        Vit::from_host(
            &be,
            &cfg,
            &uniform_ranks(&cfg, 8),
            &student_host,
            effrank_engine::options::ModelPaths::default_of(&be),
        )
        .unwrap(),
        4,
    )
    .unwrap();
    let t = teacher.logits(&be, &c.bytes, 4, &transform(&cfg)).unwrap();
    let s = student.logits(&be, &c.bytes, 4, &transform(&cfg)).unwrap();
    let scale = t.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in t.iter().zip(&s) {
        assert!(
            (a - b).abs() <= 1e-5 * scale.max(1.0),
            "teacher {a} vs student {b}"
        );
    }
}

#[test]
fn a_non_finite_loss_stops_the_step_and_leaves_the_parameters() {
    let be = Cpu;
    let cfg = tiny_config();
    let dense = dense_ranks(&cfg);
    let mut host = random_params(&cfg, &dense, 6);
    host.head.bias_mut().unwrap()[0] = f32::INFINITY;
    let model = Vit::from_host(
        &be,
        &cfg,
        &dense,
        &host,
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    let mut trainer = Trainer::new(&be, model, 4, AdamWConfig::default()).unwrap();
    let c = case(&cfg, 4);
    let before = trainer.model.to_host(&be).unwrap();
    let e = trainer
        .step(
            &be,
            Batch {
                bytes: &c.bytes,
                labels: &c.labels,
                transform: &transform(&cfg),
            },
            TeacherSignal::None,
            &LossSpec::ce(),
            1e-3,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("loss became"), "{e}");
    let after = trainer.model.to_host(&be).unwrap();
    assert_eq!(before.tensors(), after.tensors());
}

#[test]
fn a_few_steps_reduce_the_loss() {
    let be = Cpu;
    let cfg = tiny_config();
    let dense = dense_ranks(&cfg);
    let model = Vit::from_host(
        &be,
        &cfg,
        &dense,
        &random_params(&cfg, &dense, 4),
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    let mut trainer = Trainer::new(&be, model, 8, AdamWConfig::default()).unwrap();
    let c = case(&cfg, 8);
    let loss = LossSpec::ce();
    let first = trainer
        .step(
            &be,
            Batch {
                bytes: &c.bytes,
                labels: &c.labels,
                transform: &transform(&cfg),
            },
            TeacherSignal::None,
            &loss,
            3e-3,
        )
        .unwrap()
        .loss;
    let mut last = first;
    for _ in 0..30 {
        last = trainer
            .step(
                &be,
                Batch {
                    bytes: &c.bytes,
                    labels: &c.labels,
                    transform: &transform(&cfg),
                },
                TeacherSignal::None,
                &loss,
                3e-3,
            )
            .unwrap()
            .loss;
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

/// `forward_logits` (inference: the last block's query and attention for
/// the class token alone, or for every token without `class_token_query`,
/// and after attention the class-token rows only) gives the logits of the
/// full `forward`, for dense, low-rank and mixed models, at a batch below
/// the activations' capacity. The second shape is wide enough that products
/// are split over threads.
#[test]
fn logits_only_forward_matches_the_full_forward() {
    let be = Cpu;
    for cfg in [tiny_config(), wide_config()] {
        let mut mixed = uniform_ranks(&cfg, 3);
        mixed[cfg.depth - 1][BlockLinear::Fc1] = None;
        for (ranks, class_token_query) in [dense_ranks(&cfg), uniform_ranks(&cfg, 4), mixed]
            .into_iter()
            .flat_map(|r| [(r.clone(), true), (r, false)])
        {
            let mut model = Vit::from_host(
                &be,
                &cfg,
                &ranks,
                &random_params(&cfg, &ranks, 5),
                effrank_engine::options::ModelPaths::default_of(&be),
            )
            .unwrap();
            model.paths.class_token_query = class_token_query;
            let mut acts = model.new_acts(&be, 5).unwrap();
            let c = case(&cfg, 3);
            image::from_bytes(&be, &mut acts.images, &c.bytes, 3, &transform(&cfg)).unwrap();
            model.forward(&be, &mut acts, 3).unwrap();
            let full = be.download(&acts.logits).unwrap()[..3 * cfg.classes].to_vec();
            be.zero(&mut acts.logits, 5 * cfg.classes).unwrap();
            model.forward_logits(&be, &mut acts, 3).unwrap();
            let fast = be.download(&acts.logits).unwrap()[..3 * cfg.classes].to_vec();
            let scale = full.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.1, "logits too small to compare: {scale}");
            for (a, b) in fast.iter().zip(&full) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "width {}, class-token query {class_token_query}: logits-only {a} vs full {b}",
                    cfg.width
                );
            }
        }
    }
}

/// Training on the class-token tail (`forward_logits` and its backward:
/// the last block's query and attention for the class token alone or, without
/// `class_token_query`, for every token, and after attention the
/// class-token rows) gives the loss,
/// top-1 count and every gradient of the pass over every token, up to
/// rounding: dense, low-rank and mixed models (the last block's layers
/// low-rank and dense), plain and fused residual adds, hard labels and
/// cached teacher logits, a batch below the activations' capacity. The
/// second shape is wide enough that products are split over threads.
#[test]
fn class_token_tail_gives_the_gradients_of_every_token() {
    let be = Cpu;
    for cfg in [tiny_config(), wide_config()] {
        let c = case(&cfg, 3);
        let teacher_logits = Rng::new(9).normal_vec(3 * cfg.classes, 2.0);
        let mut mixed = uniform_ranks(&cfg, 3);
        mixed[cfg.depth - 1][BlockLinear::Fc1] = None;
        mixed[cfg.depth - 1][BlockLinear::Q] = None;
        for (ri, ranks) in [dense_ranks(&cfg), uniform_ranks(&cfg, 4), mixed]
            .into_iter()
            .enumerate()
        {
            let params = random_params(&cfg, &ranks, 5);
            for (fused, class_token_query) in
                [(false, true), (true, true), (false, false), (true, false)]
            {
                for (name, loss, cached) in [
                    ("ce", LossSpec::ce(), false),
                    (
                        "kd",
                        LossSpec::parse("kd=1,ce=0.5", 0.3, 3.0, 0.0).unwrap(),
                        true,
                    ),
                ] {
                    let run = |class_token_tail: bool| {
                        let mut model = Vit::from_host(
                            &be,
                            &cfg,
                            &ranks,
                            &params,
                            effrank_engine::options::ModelPaths::default_of(&be),
                        )
                        .unwrap();
                        model.paths.fused_add_layernorm = fused;
                        model.paths.class_token_tail = class_token_tail;
                        model.paths.class_token_query = class_token_query;
                        let mut l =
                            Trainer::with_shards(&be, model, 5, AdamWConfig::default(), 1).unwrap();
                        let signal = if cached {
                            TeacherSignal::Cached(&teacher_logits)
                        } else {
                            TeacherSignal::None
                        };
                        let stats = l
                            .forward_backward(
                                &be,
                                Batch {
                                    bytes: &c.bytes,
                                    labels: &c.labels,
                                    transform: &transform(&cfg),
                                },
                                signal,
                                &loss,
                            )
                            .unwrap();
                        let grads: Vec<Vec<f32>> = l
                            .grads
                            .tensors()
                            .iter()
                            .map(|g| be.download(g).unwrap())
                            .collect();
                        (stats, grads)
                    };
                    let ((every, ge), (tail, gt)) = (run(false), run(true));
                    let what = format!("width {}, ranks {ri}, fused {fused}, class-token query {class_token_query}, {name}", cfg.width);
                    assert!(
                        (every.loss - tail.loss).abs() <= 1e-5 * every.loss.abs(),
                        "{what}: loss {} every token, {} tail",
                        every.loss,
                        tail.loss
                    );
                    assert_eq!(every.correct, tail.correct, "{what}: top-1 count");
                    assert!(
                        ge.iter().flatten().any(|&g| g != 0.0),
                        "{what}: all gradients zero"
                    );
                    // As in the split-batch test: the key bias gradient is
                    // zero up to rounding, so scales are floored.
                    effrank_engine::testing::assert_close_floor(
                        &format!("{what}: class-token tail gradients"),
                        &gt,
                        &ge,
                        1e-5,
                        1e-2,
                    );
                }
            }
        }
    }
}

/// `backward` follows only a forward of the same batch, and the feature
/// gradients only the forward of every token: anything else is an error,
/// not gradients of stale activations.
#[test]
fn backward_refuses_activations_it_cannot_use() {
    let be = Cpu;
    let cfg = tiny_config();
    let ranks = dense_ranks(&cfg);
    let model = Vit::from_host(
        &be,
        &cfg,
        &ranks,
        &random_params(&cfg, &ranks, 5),
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    let mut acts = model.new_acts(&be, 3).unwrap();
    let mut scratch = model.new_scratch(&be, 3).unwrap();
    let mut grads = model.zeros_like(&be).unwrap();
    let d_logits = be
        .alloc(3 * cfg.classes, effrank_engine::device::BufKind::Activation)
        .unwrap();
    let n = 3 * cfg.tokens() * cfg.width;
    let features: Vec<_> = (0..cfg.depth)
        .map(|_| (vec![0f32; n], vec![0f32; n]))
        .collect();
    let e = model
        .backward(
            &be,
            &acts,
            OutputGrads {
                logits: &d_logits,
                features: None,
            },
            &mut grads,
            &mut scratch,
            3,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a forward pass"), "{e}");
    let c = case(&cfg, 3);
    image::from_bytes(&be, &mut acts.images, &c.bytes, 3, &transform(&cfg)).unwrap();
    model.forward_logits(&be, &mut acts, 3).unwrap();
    let e = model
        .backward(
            &be,
            &acts,
            OutputGrads {
                logits: &d_logits,
                features: None,
            },
            &mut grads,
            &mut scratch,
            2,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch of 2 after a forward of 3"), "{e}");
    let e = model
        .backward(
            &be,
            &acts,
            OutputGrads {
                logits: &d_logits,
                features: Some(&features),
            },
            &mut grads,
            &mut scratch,
            3,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("feature loss"), "{e}");
    model
        .backward(
            &be,
            &acts,
            OutputGrads {
                logits: &d_logits,
                features: None,
            },
            &mut grads,
            &mut scratch,
            3,
        )
        .unwrap();
    model.forward(&be, &mut acts, 3).unwrap();
    model
        .backward(
            &be,
            &acts,
            OutputGrads {
                logits: &d_logits,
                features: Some(&features),
            },
            &mut grads,
            &mut scratch,
            3,
        )
        .unwrap();
}

/// The fused residual add + LayerNorm path of the model (what
/// `--fused-add-layernorm on` switches on for CUDA) gives the CPU's
/// numbers bit for bit: loss, every gradient (feature loss, so every
/// sub-layer's gradient path is used), and the inference logits.
#[test]
fn fused_add_layernorm_path_gives_the_same_bits() {
    let be = Cpu;
    let cfg = VitConfig {
        depth: 3,
        ..tiny_config()
    };
    let c = case(&cfg, 3);
    let loss = LossSpec::parse("kd=1,feature=1,ce=0.5", 0.3, 3.0, 0.0).unwrap();
    let dense = dense_ranks(&cfg);
    let mut ranks = uniform_ranks(&cfg, 3);
    ranks[1][BlockLinear::Fc1] = None;
    let run = |fused: bool| {
        let mut teacher_model = Vit::from_host(
            &be,
            &cfg,
            &dense,
            &random_params(&cfg, &dense, 5),
            effrank_engine::options::ModelPaths::default_of(&be),
        )
        .unwrap();
        teacher_model.paths.fused_add_layernorm = fused;
        let mut teacher = Frozen::for_feature_loss(&be, teacher_model, 3).unwrap();
        let mut model = Vit::from_host(
            &be,
            &cfg,
            &ranks,
            &random_params(&cfg, &ranks, 6),
            effrank_engine::options::ModelPaths::default_of(&be),
        )
        .unwrap();
        assert!(
            !model.paths.fused_add_layernorm,
            "the CPU never asks for the fused path"
        );
        model.paths.fused_add_layernorm = fused;
        let mut trainer = Trainer::new(&be, model, 3, AdamWConfig::default()).unwrap();
        let l = loss_of(&be, &mut trainer, &mut teacher, &c, &loss, &cfg);
        let grads: Vec<Vec<f32>> = trainer
            .grads
            .tensors()
            .iter()
            .map(|g| be.download(g).unwrap())
            .collect();
        let logits = teacher.logits(&be, &c.bytes, 3, &transform(&cfg)).unwrap();
        (l.to_bits(), grads, logits)
    };
    let (plain, fused) = (run(false), run(true));
    assert_eq!(plain.0, fused.0, "loss");
    assert_eq!(plain.1, fused.1, "gradients");
    assert_eq!(plain.2, fused.2, "inference logits");
}

/// A batch split into shards (the CPU's default for small models) gives the
/// step of the whole batch: the same loss, top-1 count and gradients up to
/// rounding, for hard labels and for cached teacher logits (KD), with an
/// odd batch (shards of 3 and 2).
#[test]
fn a_split_batch_gives_the_whole_batch_step() {
    let be = Cpu;
    let cfg = tiny_config();
    let ranks = dense_ranks(&cfg);
    let params = random_params(&cfg, &ranks, 1);
    let c = case(&cfg, 5);
    let teacher_logits = Rng::new(9).normal_vec(5 * cfg.classes, 2.0);
    for (name, loss, cached) in [
        ("ce", LossSpec::ce(), false),
        (
            "kd",
            LossSpec {
                ce: 0.0,
                kd: 1.0,
                ..LossSpec::ce()
            },
            true,
        ),
    ] {
        let run = |shards: usize| {
            let mut l = Trainer::with_shards(
                &be,
                Vit::from_host(
                    &be,
                    &cfg,
                    &ranks,
                    &params,
                    effrank_engine::options::ModelPaths::default_of(&be),
                )
                .unwrap(),
                5,
                AdamWConfig::default(),
                shards,
            )
            .unwrap();
            assert_eq!(l.shards(), shards);
            let signal = if cached {
                TeacherSignal::Cached(&teacher_logits)
            } else {
                TeacherSignal::None
            };
            let stats = l
                .forward_backward(
                    &be,
                    Batch {
                        bytes: &c.bytes,
                        labels: &c.labels,
                        transform: &transform(&cfg),
                    },
                    signal,
                    &loss,
                )
                .unwrap();
            let grads: Vec<Vec<f32>> = l
                .grads
                .tensors()
                .iter()
                .map(|g| be.download(g).unwrap())
                .collect();
            (stats, grads)
        };
        let ((whole, gw), (split, gs)) = (run(1), run(2));
        assert!(
            (whole.loss - split.loss).abs() <= 1e-5 * whole.loss.abs(),
            "{name}: loss {} whole, {} split",
            whole.loss,
            split.loss
        );
        assert_eq!(whole.correct, split.correct, "{name}: top-1 count");
        // The key bias gradient is zero up to rounding (softmax is shift
        // invariant): its scale is floored at the largest gradient's 1e-2.
        effrank_engine::testing::assert_close_floor(
            &format!("{name}: gradients of a split batch"),
            &gs,
            &gw,
            1e-5,
            1e-2,
        );
    }
}

/// A split batch gives the same bits on one thread (shards one after the
/// other), on two (at once, a pool each) and on one with a thread lent by a
/// finished sweep worker (at once, the second half on the lent thread):
/// three optimizer steps and an evaluation, parameters and logits compared
/// bit for bit.
#[test]
fn split_batches_give_the_same_bits_on_one_thread_and_two() {
    let cfg = tiny_config();
    let ranks = dense_ranks(&cfg);
    let params = random_params(&cfg, &ranks, 1);
    let c = case(&cfg, 6);
    let train = |threads: usize, lend: bool| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let be = Cpu;
            let spare = spare_threads::SpareThreads::new();
            let lent = lend.then(|| spare.lend(1));
            let mut l = Trainer::with_shards(
                &be,
                Vit::from_host(
                    &be,
                    &cfg,
                    &ranks,
                    &params,
                    effrank_engine::options::ModelPaths::default_of(&be),
                )
                .unwrap(),
                6,
                AdamWConfig::default(),
                2,
            )
            .unwrap();
            l.borrow_from(spare.clone());
            for _ in 0..3 {
                l.step(
                    &be,
                    Batch {
                        bytes: &c.bytes,
                        labels: &c.labels,
                        transform: &transform(&cfg),
                    },
                    TeacherSignal::None,
                    &LossSpec::ce(),
                    1e-2,
                )
                .unwrap();
            }
            let at_once = l.shards_at_once();
            let mut out = l
                .model
                .params
                .tensors()
                .iter()
                .map(|t| be.download(t).unwrap())
                .collect::<Vec<_>>();
            out.push(
                l.logits(&be, &c.bytes, c.labels.len(), &transform(&cfg))
                    .unwrap(),
            );
            drop(l);
            drop(lent);
            (out, at_once)
        })
    };
    let ((one, at_once_1), (two, at_once_2), (lent, at_once_lent)) =
        (train(1, false), train(2, false), train(1, true));
    assert!(!at_once_1 && at_once_2 && at_once_lent, "shards at once: one thread {at_once_1}, two {at_once_2}, one and a lent one {at_once_lent}");
    for (name, other) in [("two threads", &two), ("a lent thread", &lent)] {
        assert_eq!(one.len(), other.len());
        for (i, (a, b)) in one.iter().zip(other).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "tensor {i} differs between one thread and {name}"
            );
        }
    }
}

/// Inference activations (two blocks' worth, taken in turn) give the same
/// logits, bit for bit, as every block's, for a model deeper than two
/// blocks whose blocks have different ranks (each slot's low-rank buffer
/// must fit the largest rank of the blocks that take it), on the full
/// forward and the logits-only one; and they refuse a backward pass.
#[test]
fn inference_activations_give_the_logits_of_every_blocks() {
    let be = Cpu;
    let mut cfg = wide_config();
    cfg.depth = 5;
    let mut ranks = dense_ranks(&cfg);
    ranks[0][BlockLinear::Fc1] = Some(3);
    ranks[2][BlockLinear::Fc1] = Some(9);
    ranks[1][BlockLinear::Q] = Some(5);
    ranks[4][BlockLinear::V] = Some(2);
    let model = Vit::from_host(
        &be,
        &cfg,
        &ranks,
        &random_params(&cfg, &ranks, 11),
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    let c = case(&cfg, 3);
    let mut full = model.new_acts(&be, 4).unwrap();
    let mut small = model.new_inference_acts(&be, 4).unwrap();
    assert_eq!(small.blocks.len(), 2);
    for logits_only in [false, true] {
        let mut out = Vec::new();
        for acts in [&mut full, &mut small] {
            image::from_bytes(&be, &mut acts.images, &c.bytes, 3, &transform(&cfg)).unwrap();
            if logits_only {
                model.forward_logits(&be, acts, 3).unwrap();
            } else {
                model.forward(&be, acts, 3).unwrap();
            }
            out.push(be.download(&acts.logits).unwrap()[..3 * cfg.classes].to_vec());
        }
        assert!(out[0].iter().any(|v| v.abs() > 1e-3));
        assert_eq!(out[0], out[1], "logits only: {logits_only}");
    }
    let mut grads = model.zeros_like(&be).unwrap();
    let mut scratch = model.new_scratch(&be, 4).unwrap();
    let d = be
        .alloc(4 * cfg.classes, effrank_engine::device::BufKind::Activation)
        .unwrap();
    let err = model
        .backward(
            &be,
            &small,
            OutputGrads {
                logits: &d,
                features: None,
            },
            &mut grads,
            &mut scratch,
            3,
        )
        .expect_err("backward on inference activations must fail")
        .to_string();
    assert!(err.contains("allocated for inference"), "{err}");
}
