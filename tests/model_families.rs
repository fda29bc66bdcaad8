//! Every ViT family (`model::family`) through the CPU model: the
//! hand-written backward against central finite differences for each
//! family (and the feature loss through LayerScale), a full-rank SVD
//! student reproducing its teacher, parameter counts by hand, checkpoints
//! that keep the family, and configs that contradict themselves.
//!
//! The finite differences follow tests/model_gradients.rs (step 3e-3,
//! tolerance 2% relative + 2e-4 absolute).

use effrank_engine::device::{Cpu, Device};
use effrank_engine::factorize::{factorize, FactorInit};
use effrank_engine::model::checkpoint::{load_checkpoint, save_checkpoint};
use effrank_engine::model::params::{dense_ranks, param_count, param_specs, uniform_ranks, Ranks};
use effrank_engine::model::{Family, Pool, PosEmbed, Vit, VitConfig, VitParams};
use effrank_engine::ops::gelu::Activation;
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::options::ModelPaths;
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Batch, Frozen, LossSpec, TeacherSignal, Trainer};
use std::collections::BTreeMap;

/// The families, each as a small model: (name, family).
fn families() -> Vec<(&'static str, Family)> {
    let plain = Family::default();
    vec![
        (
            "deit-distilled",
            Family {
                dist_token: true,
                pool: Pool::Distilled,
                ..plain
            },
        ),
        (
            "deit-class-head",
            Family {
                dist_token: true,
                ..plain
            },
        ),
        (
            "deit3",
            Family {
                pos_embed: PosEmbed::PatchesOnly,
                layer_scale: true,
                ..plain
            },
        ),
        (
            "dinov2",
            Family {
                layer_scale: true,
                ..plain
            },
        ),
        (
            "dinov2-registers",
            Family {
                registers: 2,
                pos_embed: PosEmbed::PatchesOnly,
                layer_scale: true,
                ..plain
            },
        ),
        (
            "dinov2-classifier",
            Family {
                registers: 2,
                layer_scale: true,
                pool: Pool::ClassAndMean,
                ..plain
            },
        ),
        (
            "clip",
            Family {
                norm_pre: true,
                patch_bias: false,
                act: Activation::QuickGelu,
                ..plain
            },
        ),
        (
            "average-pool",
            Family {
                class_token: false,
                pool: Pool::Average,
                ..plain
            },
        ),
        (
            "no-qkv-bias-tanh",
            Family {
                qkv_bias: false,
                act: Activation::GeluTanh,
                ..plain
            },
        ),
    ]
}

fn config(family: Family) -> VitConfig {
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
        family,
    }
}

/// Random parameters: LayerNorm scales near 1, LayerScale near 0.5 (so the
/// sub-layers matter), everything else N(0, 0.4²).
fn random_params(cfg: &VitConfig, ranks: &Ranks, seed: u64) -> VitParams<Vec<f32>> {
    let mut rng = Rng::new(seed);
    VitParams::build(cfg, ranks, |s| {
        let centre = if s.name.contains("norm") && s.name.ends_with(".weight") {
            1.0
        } else if s.name.ends_with(".gamma") {
            0.5
        } else {
            0.0
        };
        let v = (0..s.numel())
            .map(|_| centre + 0.4 * rng.normal() as f32)
            .collect();
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

fn model(cfg: &VitConfig, ranks: &Ranks, host: &VitParams<Vec<f32>>) -> Vit<Cpu> {
    Vit::from_host(&Cpu, cfg, ranks, host, ModelPaths::default_of(&Cpu)).unwrap()
}

fn loss_of(
    trainer: &mut Trainer<Cpu>,
    teacher: &mut Frozen<Cpu>,
    c: &Case,
    loss: &LossSpec,
) -> f32 {
    let cfg = trainer.model.cfg.clone();
    trainer
        .forward_backward(
            &Cpu,
            Batch {
                bytes: &c.bytes,
                labels: &c.labels,
                transform: &transform(&cfg),
            },
            TeacherSignal::Live(teacher),
            loss,
        )
        .unwrap()
        .loss
}

/// Every parameter's analytic gradient against central finite differences
/// at four random entries per tensor.
fn check_gradients(
    name: &str,
    cfg: &VitConfig,
    ranks: &Ranks,
    loss: &LossSpec,
    class_token_tail: bool,
) {
    let be = Cpu;
    let mut student = model(cfg, ranks, &random_params(cfg, ranks, 1));
    student.paths.class_token_tail = class_token_tail;
    let dense = dense_ranks(cfg);
    let teacher_model = model(cfg, &dense, &random_params(cfg, &dense, 2));
    let mut teacher = Frozen::for_feature_loss(&be, teacher_model, 3).unwrap();
    let mut trainer = Trainer::new(&be, student, 3, AdamWConfig::default()).unwrap();
    let c = case(cfg, 3);
    loss_of(&mut trainer, &mut teacher, &c, loss);
    let grads: Vec<Vec<f32>> = trainer
        .grads
        .tensors()
        .iter()
        .map(|g| be.download(g).unwrap())
        .collect();
    let h = 3e-3f32;
    let mut rng = Rng::new(5);
    for (ti, spec) in param_specs(cfg, ranks).iter().enumerate() {
        let base = be.download(trainer.model.params.tensors()[ti]).unwrap();
        for _ in 0..4 {
            let i = rng.below(spec.numel());
            let mut p = base.clone();
            p[i] = base[i] + h;
            be.write(trainer.model.params.tensors_mut()[ti], &p)
                .unwrap();
            let up = loss_of(&mut trainer, &mut teacher, &c, loss);
            p[i] = base[i] - h;
            be.write(trainer.model.params.tensors_mut()[ti], &p)
                .unwrap();
            let down = loss_of(&mut trainer, &mut teacher, &c, loss);
            be.write(trainer.model.params.tensors_mut()[ti], &base)
                .unwrap();
            let numeric = (up - down) / (2.0 * h);
            let analytic = grads[ti][i];
            let tol = 2e-2 * numeric.abs().max(analytic.abs()) + 2e-4;
            assert!(
                (numeric - analytic).abs() <= tol,
                "{name}: {}[{i}] (class-token tail {class_token_tail}): analytic {analytic}, finite difference {numeric}",
                spec.name
            );
        }
    }
}

#[test]
fn every_familys_gradients_match_finite_differences() {
    for (name, family) in families() {
        let cfg = config(family);
        let mut ranks = dense_ranks(&cfg);
        ranks[1] = uniform_ranks(&cfg, 3)[1];
        for tail in [false, true] {
            check_gradients(name, &cfg, &ranks, &LossSpec::ce(), tail);
        }
    }
}

#[test]
fn the_feature_loss_reaches_through_layerscale() {
    let (name, family) = families()
        .into_iter()
        .find(|f| f.0 == "dinov2-registers")
        .unwrap();
    let cfg = config(family);
    let loss = LossSpec::parse("kd=1,feature=1,ce=0.5", 0.3, 3.0, 0.0).unwrap();
    check_gradients(name, &cfg, &uniform_ranks(&cfg, 3), &loss, false);
}

#[test]
fn a_full_rank_student_reproduces_its_teacher_in_every_family() {
    for (name, family) in families() {
        let cfg = config(family);
        let dense = dense_ranks(&cfg);
        let host = random_params(&cfg, &dense, 3);
        let full = uniform_ranks(&cfg, 8);
        let (student_host, _) = factorize(&cfg, &host, &full, FactorInit::Svd, None).unwrap();
        let c = case(&cfg, 4);
        let mut teacher = Frozen::new(&Cpu, model(&cfg, &dense, &host), 4).unwrap();
        let mut student = Frozen::new(&Cpu, model(&cfg, &full, &student_host), 4).unwrap();
        let t = teacher.logits(&Cpu, &c.bytes, 4, &transform(&cfg)).unwrap();
        let s = student.logits(&Cpu, &c.bytes, 4, &transform(&cfg)).unwrap();
        let scale = t.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in t.iter().zip(&s) {
            assert!(
                (a - b).abs() <= 1e-5 * scale.max(1.0),
                "{name}: teacher {a} vs student {b}"
            );
        }
    }
}

#[test]
fn parameter_counts_match_a_hand_count() {
    for (name, family) in families() {
        let cfg = config(family);
        let (d, m, k, p) = (cfg.width, cfg.mlp, cfg.classes, cfg.n_patches());
        let f = &cfg.family;
        let qkv_bias = if f.qkv_bias { 3 * d } else { 0 };
        let layer_scale = if f.layer_scale { 2 * d } else { 0 };
        let block =
            4 * d + 3 * d * d + qkv_bias + (d * d + d) + (d * m + m) + (m * d + d) + layer_scale;
        let prefix = usize::from(f.class_token) + usize::from(f.dist_token) + f.registers;
        let pos = match f.pos_embed {
            PosEmbed::AllTokens => prefix + p,
            PosEmbed::PatchesOnly => p,
        };
        let head_in = if f.pool == Pool::ClassAndMean {
            2 * d
        } else {
            d
        };
        let heads = (head_in * k + k)
            + if f.pool == Pool::Distilled {
                d * k + k
            } else {
                0
            };
        let hand = 3 * 16 * d
            + if f.patch_bias { d } else { 0 }
            + prefix * d
            + pos * d
            + if f.norm_pre { 2 * d } else { 0 }
            + cfg.depth * block
            + 2 * d
            + heads;
        assert_eq!(param_count(&cfg, &dense_ranks(&cfg)), hand, "{name}");
    }
}

#[test]
fn checkpoints_keep_the_family() {
    let dir = tempfile::tempdir().unwrap();
    for (name, family) in families() {
        let cfg = config(family);
        let mut ranks = dense_ranks(&cfg);
        ranks[0] = uniform_ranks(&cfg, 2)[0];
        let host = random_params(&cfg, &ranks, 4);
        let path = dir.path().join(format!("{name}.safetensors"));
        save_checkpoint(&path, &cfg, &ranks, &host, &BTreeMap::new()).unwrap();
        let back = load_checkpoint(&path).unwrap();
        assert_eq!(back.cfg, cfg, "{name}");
        assert_eq!(back.params.tensors(), host.tensors(), "{name}");
    }
}

#[test]
fn contradicting_configs_are_named() {
    let cases = [
        (
            Family {
                class_token: false,
                ..Family::default()
            },
            "class_token",
        ),
        (
            Family {
                pool: Pool::Distilled,
                ..Family::default()
            },
            "dist_token",
        ),
    ];
    for (family, field) in cases {
        let e = config(family).validate().unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}
