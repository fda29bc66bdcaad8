//! The whole model on the GPU against the CPU reference: a tiny ViT's
//! forward, backward and one AdamW step (dense and low-rank), and the
//! inference forward. Each op's own CPU-vs-CUDA comparison lives beside
//! the op (`src/ops/<op>/mod.rs`, `on_every_device!`).
//!
//! Checks run on the fp32 device (errors measured as
//! `max |gpu − cpu| / max |cpu|` per buffer) and on the bf16
//! mixed-precision device (activations rounded to bf16: tolerance 3e-2
//! for the whole model), each on the default paths and with every path
//! that is off by default switched on (`CudaPaths::all`). Each check prints
//! its measured error.
//!
//! Tests that need a GPU are `#[ignore = "needs a CUDA GPU"]`; run them with
//! `cargo test --test cuda_model -- --include-ignored` on a GPU machine.
#![cfg(feature = "cuda")]

use effrank_engine::device::cuda::cuda_available;
use effrank_engine::device::{Cpu, Cuda, Device, Precision};
use effrank_engine::model::params::{dense_ranks, uniform_ranks, Ranks};
use effrank_engine::model::{Vit, VitConfig, VitParams};
use effrank_engine::ops::image::{self, ImageTransform};
use effrank_engine::ops::Backend;
use effrank_engine::options::{ComputeOptions, DeviceKind, ModelPaths};
use effrank_engine::rng::Rng;
use effrank_engine::testing::{assert_close, assert_close_floor, cuda, cuda_new_paths, RED};
use effrank_engine::train::{AdamWConfig, Batch, LossSpec, TeacherSignal, Trainer};

const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Bf16];

/// The device of a precision on the default paths, or with every new path on.
/// The model paths of a GPU test: the default ones, or every path that is
/// off by default on (with the device of `gpu`).
fn gpu_paths(new_paths: bool) -> ModelPaths {
    let options = if new_paths {
        ComputeOptions::every_path()
    } else {
        ComputeOptions::default()
    };
    options.resolve(DeviceKind::Cuda).model
}

fn gpu(p: Precision, new_paths: bool) -> Cuda {
    if new_paths {
        cuda_new_paths(p)
    } else {
        cuda(p)
    }
}

/// (new paths, ranks) of every model check: both paths, dense and rank 8.
fn cases(cfg: &VitConfig) -> Vec<(bool, Ranks)> {
    [false, true]
        .into_iter()
        .flat_map(|new| [dense_ranks(cfg), uniform_ranks(cfg, 8)].map(|r| (new, r)))
        .collect()
}

#[test]
fn without_a_gpu_new_returns_a_clear_error() {
    if cuda_available() {
        return;
    }
    let e = match Cuda::new(0) {
        Ok(_) => panic!("Cuda::new succeeded although cuda_available() is false"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("--device cpu") || e.contains("NVRTC"),
        "unclear error: {e}"
    );
}

fn tiny_config() -> VitConfig {
    VitConfig {
        image_size: 16,
        channels: 3,
        patch: 4,
        width: 32,
        depth: 2,
        heads: 2,
        mlp: 48,
        classes: 10,
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
                .map(|_| 1.0 + 0.1 * rng.normal() as f32)
                .collect()
        } else {
            rng.normal_vec(s.numel(), 0.1)
        };
        Ok::<_, ()>(v)
    })
    .unwrap()
}

/// Loss, gradients after one forward/backward, and parameters after one step.
fn one_step<B: Backend>(
    be: &B,
    paths: ModelPaths,
    cfg: &VitConfig,
    ranks: &Ranks,
    bytes: &[u8],
    labels: &[u32],
) -> (f32, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = ImageTransform {
        channels: 3,
        src_height: 20,
        src_width: 20,
        dst_size: cfg.image_size,
        mean: [0.5; 3],
        std: [0.25; 3],
        resize: None,
    };
    let model = Vit::from_host(be, cfg, ranks, &random_params(cfg, ranks, 1), paths).unwrap();
    let mut trainer = Trainer::new(be, model, labels.len(), AdamWConfig::default()).unwrap();
    let loss = trainer
        .step(
            be,
            Batch {
                bytes,
                labels,
                transform: &t,
            },
            TeacherSignal::None,
            &LossSpec::ce(),
            1e-3,
        )
        .unwrap()
        .loss;
    let grads = trainer
        .grads
        .tensors()
        .iter()
        .map(|g| be.download(g).unwrap())
        .collect();
    let params = trainer
        .model
        .params
        .tensors()
        .iter()
        .map(|p| be.download(p).unwrap())
        .collect();
    (loss, grads, params)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn whole_vit_step_matches_cpu() {
    let cfg = tiny_config();
    let batch = 6;
    let mut rng = Rng::new(53);
    let bytes: Vec<u8> = (0..batch * 3 * 20 * 20)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    for p in PRECISIONS {
        // fp32: rounding only. bf16: every activation rounded to 8 bits, so
        // gradients agree to a few percent of their scale; one AdamW step
        // moves each weight by about lr, so the updated weights still agree
        // closely.
        // Errors are measured against max(the tensor's own largest gradient,
        // `floor` × the model's largest gradient). fp32: only the key bias,
        // zero analytically, needs the floor. bf16: the residual stream's
        // gradient is summed in bf16 through every block, so its rounding
        // error is proportional to the large gradients that flow through it,
        // not to a small tensor's own scale; measured on an H100, the worst
        // small tensor was off by 5% of its own scale and 0.05% of the
        // model's largest gradient, so the bf16 floor is 3e-2.
        let (loss_tol, grad_tol, param_tol, floor) = match p {
            Precision::F32 => (1e-4, 1e-3, 1e-4, 1e-3),
            Precision::Bf16 => (1e-2, 3e-2, 0.0, 3e-2),
        };
        for (new_paths, ranks) in cases(&cfg) {
            let (lc, gc, pc) = one_step(
                &Cpu,
                ModelPaths::default_of(&Cpu),
                &cfg,
                &ranks,
                &bytes,
                &labels,
            );
            let (lg, gg, pg) = one_step(
                &gpu(p, new_paths),
                gpu_paths(new_paths),
                &cfg,
                &ranks,
                &bytes,
                &labels,
            );
            println!("{p:?}, new paths {new_paths}: loss cpu {lc} gpu {lg}");
            assert!(
                (lc - lg).abs() <= loss_tol * lc.abs().max(1.0),
                "{p:?}: loss cpu {lc} gpu {lg}"
            );
            assert_close_floor(
                &format!("ViT gradients {p:?}, new paths {new_paths}"),
                &gg,
                &gc,
                grad_tol,
                floor,
            );
            // AdamW moves a weight by about lr · g/|g|: where the gradient is
            // zero up to rounding (the key bias: softmax ignores a constant
            // shift of the scores), its direction is rounding noise on both
            // devices, so those tensors are left out of the parameter check.
            let global = gc.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let keep: Vec<usize> = (0..gc.len())
                .filter(|&i| gc[i].iter().fold(0f32, |m, v| m.max(v.abs())) > 1e-4 * global)
                .collect();
            println!(
                "{p:?}: {} of {} parameter tensors have a non-degenerate gradient",
                keep.len(),
                gc.len()
            );
            assert!(
                keep.len() + 2 * cfg.depth >= gc.len(),
                "{p:?}: too many tensors with zero gradient"
            );
            let pick = |v: &[Vec<f32>]| keep.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
            match p {
                Precision::F32 => assert_close(
                    &format!("ViT parameters after one AdamW step {p:?}"),
                    &pick(&pg),
                    &pick(&pc),
                    param_tol,
                ),
                Precision::Bf16 => {
                    // At step 1 AdamW moves every weight by lr · g/(|g| + eps):
                    // where bf16 noise flips the sign of a tiny gradient element
                    // the two updates differ by up to 2 lr, never more.
                    let lr = 1e-3f32;
                    let worst = pg
                        .iter()
                        .flatten()
                        .zip(pc.iter().flatten())
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    println!("{p:?}: parameters after one AdamW step differ by at most {worst:.2e} (bound 2.05 lr = {:.2e})", 2.05 * lr);
                    assert!(
                        worst <= 2.05 * lr,
                        "{p:?}: parameters after one step differ by {worst:e} > 2.05 lr"
                    );
                    let _ = param_tol;
                }
            }
        }
    }
}

/// The inference forward (`forward_logits`: the last block after attention
/// on the class-token rows only) on the GPU against the CPU's full forward.
#[test]
#[ignore = "needs a CUDA GPU"]
fn logits_only_forward_matches_cpu() {
    let cfg = tiny_config();
    let batch = 5;
    let mut rng = Rng::new(59);
    let bytes: Vec<u8> = (0..batch * 3 * 20 * 20)
        .map(|_| rng.below(256) as u8)
        .collect();
    let t = ImageTransform {
        channels: 3,
        src_height: 20,
        src_width: 20,
        dst_size: cfg.image_size,
        mean: [0.5; 3],
        std: [0.25; 3],
        resize: None,
    };
    for p in PRECISIONS {
        for (new_paths, ranks) in cases(&cfg) {
            let cpu = Cpu;
            let model = Vit::from_host(
                &cpu,
                &cfg,
                &ranks,
                &random_params(&cfg, &ranks, 2),
                ModelPaths::default_of(&cpu),
            )
            .unwrap();
            let mut acts = model.new_acts(&cpu, batch).unwrap();
            image::from_bytes(&cpu, &mut acts.images, &bytes, batch, &t).unwrap();
            model.forward(&cpu, &mut acts, batch).unwrap();
            let want = cpu.download(&acts.logits).unwrap();

            let gpu = gpu(p, new_paths);
            let model = Vit::from_host(
                &gpu,
                &cfg,
                &ranks,
                &random_params(&cfg, &ranks, 2),
                gpu_paths(new_paths),
            )
            .unwrap();
            let mut acts = model.new_acts(&gpu, batch).unwrap();
            image::from_bytes(&gpu, &mut acts.images, &bytes, batch, &t).unwrap();
            model.forward_logits(&gpu, &mut acts, batch).unwrap();
            let got = gpu.download(&acts.logits).unwrap();
            // bf16: the whole model's tolerance (see `whole_vit_step_matches_cpu`).
            let tolerance = match p {
                Precision::F32 => RED,
                Precision::Bf16 => 3e-2,
            };
            assert_close(
                &format!("logits-only forward {p:?}, new paths {new_paths}"),
                &[got],
                &[want],
                tolerance,
            );
        }
    }
}

/// Every family but the plain one (`model::family`), a step on the GPU with
/// its kernels switched on (`--family-kernels on`) against the CPU: loss
/// and gradients, fp32 and bf16.
#[test]
#[ignore = "needs a CUDA GPU"]
fn every_familys_step_matches_cpu() {
    use effrank_engine::model::{Family, Pool, PosEmbed};
    use effrank_engine::ops::gelu::Activation;
    let plain = Family::default();
    let families = [
        Family {
            dist_token: true,
            pool: Pool::Distilled,
            ..plain
        },
        Family {
            registers: 2,
            pos_embed: PosEmbed::PatchesOnly,
            layer_scale: true,
            ..plain
        },
        Family {
            registers: 1,
            layer_scale: true,
            pool: Pool::ClassAndMean,
            ..plain
        },
        Family {
            norm_pre: true,
            patch_bias: false,
            act: Activation::QuickGelu,
            ..plain
        },
        Family {
            class_token: false,
            pool: Pool::Average,
            qkv_bias: false,
            act: Activation::GeluTanh,
            ..plain
        },
    ];
    let batch = 6;
    let mut rng = Rng::new(54);
    let bytes: Vec<u8> = (0..batch * 3 * 20 * 20)
        .map(|_| rng.below(256) as u8)
        .collect();
    for family in families {
        let cfg = VitConfig {
            family,
            ..tiny_config()
        };
        let labels: Vec<u32> = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
        for p in PRECISIONS {
            let (loss_tol, grad_tol, floor) = match p {
                Precision::F32 => (1e-4, 1e-3, 1e-3),
                Precision::Bf16 => (1e-2, 3e-2, 3e-2),
            };
            let mut options = ComputeOptions::default();
            options.family_kernels = effrank_engine::options::Switch::On;
            let paths = options.resolve(DeviceKind::Cuda).model;
            for ranks in [dense_ranks(&cfg), uniform_ranks(&cfg, 8)] {
                let (lc, gc, _) = one_step(
                    &Cpu,
                    ModelPaths::default_of(&Cpu),
                    &cfg,
                    &ranks,
                    &bytes,
                    &labels,
                );
                let (lg, gg, _) = one_step(&cuda(p), paths, &cfg, &ranks, &bytes, &labels);
                println!("{}, {p:?}: loss cpu {lc} gpu {lg}", family.describe());
                assert!(
                    (lc - lg).abs() <= loss_tol * lc.abs().max(1.0),
                    "{}, {p:?}: loss cpu {lc} gpu {lg}",
                    family.describe()
                );
                assert_close_floor(
                    &format!("{} gradients {p:?}", family.describe()),
                    &gg,
                    &gc,
                    grad_tol,
                    floor,
                );
            }
        }
    }
}
