//! Every CUDA operation against the CPU reference, through the `Backend`
//! trait, on fresh random inputs: forward and backward, overwrite and
//! accumulate semantics (outputs that are ADDED to start non-zero), fused
//! and fallback paths (low-rank rank > 256, attention past the fused
//! kernel's shared memory). Then a whole tiny ViT: forward, backward and one
//! AdamW step on both devices.
//!
//! All fp32: errors are measured as `max |gpu − cpu| / max |cpu|` per
//! output buffer, with tolerance 1e-5 for elementwise operations and 1e-4
//! where the GPU sums long reductions in another order (GEMM, norms).
//!
//! Tests that need a GPU are `#[ignore = "needs a CUDA GPU"]`; run them with
//! `cargo test --test cuda_ops -- --include-ignored` on a GPU machine.
#![cfg(feature = "cuda")]

use effrank_engine::backend::cuda::{cuda_available, CudaBackend};
use effrank_engine::backend::{AdamWStep, Backend, BufKind, CpuBackend, ImageTransform, LogitLossConfig};
use effrank_engine::model::params::{dense_ranks, uniform_ranks, Ranks};
use effrank_engine::model::{Vit, VitConfig, VitParams};
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Learner, LossSpec, TeacherSignal};

const EW: f32 = 1e-5;
const RED: f32 = 1e-4;

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("CUDA device 0")
}

fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, std)
}

/// Panics naming the buffer when `max |got − want| > tol · max |want|`.
fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: buffer count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: buffer {i} length");
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-20);
        let (at, err) = g.iter().zip(w).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f32), |(bi, be), (j, e)| if e > be || e.is_nan() { (j, e) } else { (bi, be) });
        assert!(err <= tol * scale && g.iter().all(|v| v.is_finite()) == w.iter().all(|v| v.is_finite()),
            "{what}: buffer {i}: max error {err:e} at {at} (gpu {}, cpu {}), scale {scale:e}, tolerance {tol:e}", g[at], w[at]);
    }
}

/// Uploads `inputs` to both backends, runs the body on each with the
/// buffers bound to the given names, and returns `(cpu, gpu)` downloads of
/// every buffer.
macro_rules! both {
    ($inputs:expr, |$be:ident, [$($b:ident),*]| $body:block) => {{
        let inputs: Vec<Vec<f32>> = $inputs;
        let cpu = CpuBackend::default();
        let cuda = gpu();
        let on_cpu = {
            let $be = &cpu;
            let mut bufs: Vec<_> = inputs.iter().map(|h| $be.upload(h, BufKind::Activation).unwrap()).collect();
            {
                let [$($b),*] = bufs.as_mut_slice() else { unreachable!() };
                $body
            }
            bufs.iter().map(|b| $be.download(b).unwrap()).collect::<Vec<_>>()
        };
        let on_gpu = {
            let $be = &cuda;
            let mut bufs: Vec<_> = inputs.iter().map(|h| $be.upload(h, BufKind::Activation).unwrap()).collect();
            {
                let [$($b),*] = bufs.as_mut_slice() else { unreachable!() };
                $body
            }
            bufs.iter().map(|b| $be.download(b).unwrap()).collect::<Vec<_>>()
        };
        (on_cpu, on_gpu)
    }};
}

#[test]
fn without_a_gpu_new_returns_a_clear_error() {
    if cuda_available() {
        return;
    }
    let e = match CudaBackend::new(0) {
        Ok(_) => panic!("CudaBackend::new succeeded although cuda_available() is false"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("--device cpu") || e.contains("NVRTC"), "unclear error: {e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn memory_ops_match() {
    let n = 10_007;
    let (c, g) = both!(vec![randn(1, n, 1.0), randn(2, n, 1.0), randn(3, n, 1.0), randn(4, n, 1.0)], |be, [a, b, z, d]| {
        be.add_assign(a, b, n - 3).unwrap();
        be.zero(z, n / 2).unwrap();
        be.copy(d, b, n - 5).unwrap();
        be.write(b, &[7.0; 100]).unwrap();
    });
    assert_close("memory ops", &g, &c, 0.0);
    let cuda = gpu();
    assert_eq!(cuda.len(&cuda.alloc(123, BufKind::Param).unwrap()), 123);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_all_transposes_and_accumulate() {
    let (m, n, k) = (77, 130, 301);
    for ta in [false, true] {
        for tb in [false, true] {
            for acc in [false, true] {
                let (c, g) = both!(vec![randn(5, m * n, 1.0), randn(6, m * k, 1.0), randn(7, k * n, 1.0)], |be, [out, a, b]| {
                    be.matmul(out, a, b, m, n, k, ta, tb, acc).unwrap();
                });
                assert_close(&format!("matmul ta={ta} tb={tb} acc={acc}"), &g, &c, RED);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_forward_and_bias_backward() {
    let (rows, inp, out) = (333, 96, 257);
    let (c, g) = both!(vec![randn(8, rows * out, 1.0), randn(9, rows * inp, 1.0), randn(10, out * inp, 0.3), randn(11, out, 1.0), randn(12, out, 1.0)], |be, [y, x, w, bias, dbias]| {
        be.linear_forward(y, x, w, bias, rows, inp, out).unwrap();
        be.bias_backward(dbias, y, rows, out).unwrap();
    });
    assert_close("linear + bias backward", &g, &c, RED);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lowrank_forward_fused_and_fallback() {
    let (rows, inp, out) = (1000, 192, 300);
    for rank in [1, 16, 100, 256, 300] {
        let (c, g) = both!(vec![vec![0.0; rows * out], vec![0.0; rows * rank], randn(13, rows * inp, 1.0), randn(14, rank * inp, 0.1), randn(15, out * rank, 0.1), randn(16, out, 1.0)], |be, [y, h, x, v, u, bias]| {
            be.lowrank_forward(y, h, x, v, u, bias, rows, inp, rank, out).unwrap();
        });
        assert_close(&format!("lowrank rank {rank}"), &g, &c, RED);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelu_forward_and_backward() {
    let n = 100_003;
    let (c, g) = both!(vec![randn(17, n, 3.0), vec![0.0; n], randn(18, n, 1.0), vec![0.0; n]], |be, [x, out, dout, dx]| {
        be.gelu_forward(out, x, n).unwrap();
        be.gelu_backward(dx, x, dout, n).unwrap();
    });
    assert_close("gelu", &g, &c, EW);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn layernorm_forward_and_backward_add() {
    let (rows, cols) = (517, 768);
    let mut x = randn(19, rows * cols, 2.0);
    for v in x.iter_mut().step_by(7) {
        *v += 5.0;
    }
    let gamma: Vec<f32> = randn(20, cols, 0.3).iter().map(|v| 1.0 + v).collect();
    let inputs = vec![x, gamma, randn(21, cols, 0.5), vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows], randn(22, rows * cols, 1.0), randn(23, rows * cols, 1.0), randn(24, cols, 1.0), randn(25, cols, 1.0)];
    let (c, g) = both!(inputs, |be, [x, gamma, beta, out, mean, rstd, dout, dx, dgamma, dbeta]| {
        be.layernorm_forward(out, mean, rstd, x, gamma, beta, rows, cols, 1e-6).unwrap();
        be.layernorm_backward(dx, dgamma, dbeta, dout, x, mean, rstd, gamma, rows, cols).unwrap();
    });
    assert_close("layernorm", &g, &c, RED);
}

fn check_attention(batch: usize, tokens: usize, heads: usize, head_dim: usize) {
    let n = batch * tokens * heads * head_dim;
    let p = batch * heads * tokens * tokens;
    let inputs = vec![randn(26, n, 1.0), randn(27, n, 1.0), randn(28, n, 1.0), vec![0.0; n], vec![0.0; p], randn(29, n, 1.0), randn(30, n, 1.0), randn(31, n, 1.0), randn(32, n, 1.0)];
    let (c, g) = both!(inputs, |be, [q, k, v, out, probs, dout, dq, dk, dv]| {
        be.attention_forward(out, probs, q, k, v, batch, tokens, heads, head_dim).unwrap();
        be.attention_backward(dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim).unwrap();
    });
    assert_close(&format!("attention b{batch} t{tokens} h{heads} dh{head_dim}"), &g, &c, RED);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_fused_vit_shapes() {
    check_attention(2, 197, 3, 64);
    check_attention(3, 17, 2, 8);
    check_attention(1, 65, 1, 128);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_unfused_fallback_for_long_sequences() {
    check_attention(2, 300, 2, 64);
    check_attention(1, 256, 2, 128);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_and_pooling_forward_and_backward() {
    let (batch, channels, size, patch, width) = (3, 3, 32, 8, 40);
    let np = (size / patch) * (size / patch);
    let t = np + 1;
    let inputs = vec![
        randn(33, batch * channels * size * size, 1.0),
        vec![0.0; batch * channels * size * size],
        randn(34, batch * np * width, 1.0),
        randn(35, width, 1.0),
        randn(36, t * width, 1.0),
        vec![0.0; batch * t * width],
        randn(37, batch * t * width, 1.0),
        randn(38, batch * np * width, 1.0),
        randn(39, width, 1.0),
        randn(40, t * width, 1.0),
        vec![0.0; batch * width],
        randn(41, batch * width, 1.0),
    ];
    let (c, g) = both!(inputs, |be, [images, patches, patch_out, cls, pos, x, dx, dpatch, dcls, dpos, pooled, dpooled]| {
        be.patch_gather(patches, images, batch, channels, size, patch).unwrap();
        be.tokens_forward(x, patch_out, cls, pos, batch, np, width).unwrap();
        be.tokens_backward(dpatch, dcls, dpos, dx, batch, np, width).unwrap();
        be.cls_gather(pooled, x, batch, t, width).unwrap();
        be.cls_scatter_add(dx, dpooled, batch, t, width).unwrap();
    });
    assert_close("embed", &g, &c, EW);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn images_from_bytes_resize_and_normalize() {
    for (h, w, s) in [(32, 32, 24), (20, 27, 37), (16, 16, 16)] {
        let batch = 2;
        let t = ImageTransform { channels: 3, src_height: h, src_width: w, dst_size: s, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
        let mut rng = Rng::new(42);
        let bytes: Vec<u8> = (0..batch * 3 * h * w).map(|_| rng.below(256) as u8).collect();
        let (c, g) = both!(vec![vec![0.0; batch * 3 * s * s]], |be, [out]| {
            be.images_from_bytes(out, &bytes, batch, &t).unwrap();
        });
        assert_close(&format!("images {h}x{w} -> {s}"), &g, &c, EW);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logit_loss_every_term() {
    let (batch, classes) = (37, 1000);
    let mut rng = Rng::new(43);
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
    let configs = [
        LogitLossConfig { ce_weight: 1.0, label_smoothing: 0.1, kd_weight: 0.0, temperature: 1.0, feature_weight: 0.0 },
        LogitLossConfig { ce_weight: 0.0, label_smoothing: 0.0, kd_weight: 1.0, temperature: 4.0, feature_weight: 0.0 },
        LogitLossConfig { ce_weight: 0.0, label_smoothing: 0.0, kd_weight: 0.0, temperature: 1.0, feature_weight: 1.0 },
        LogitLossConfig { ce_weight: 0.5, label_smoothing: 0.1, kd_weight: 0.5, temperature: 2.0, feature_weight: 0.3 },
    ];
    for cfg in configs {
        let (c, g) = both!(vec![randn(44, batch * classes, 3.0), randn(45, batch * classes, 3.0), vec![0.0; batch * classes], vec![0.25]], |be, [s, t, ds, loss]| {
            be.logit_loss(ds, loss, s, Some(t), &labels, batch, classes, &cfg, 0.5).unwrap();
        });
        assert_close(&format!("logit loss {cfg:?}"), &g, &c, RED);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn feature_loss_adds() {
    let (rows, cols) = (197 * 3, 192);
    let (c, g) = both!(vec![randn(46, rows * cols, 1.0), randn(47, rows * cols, 1.0), randn(48, rows * cols, 1e-3), vec![1.5]], |be, [s, t, ds, loss]| {
        be.feature_loss(ds, loss, s, t, rows, cols, 0.7).unwrap();
    });
    assert_close("feature loss", &g, &c, RED);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sum_squares_and_adamw_with_and_without_clipping() {
    let n = 300_001;
    for clip in [None, Some(0.5), Some(1e6)] {
        let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, step: 3, max_grad_norm: clip };
        let (c, g) = both!(vec![randn(49, n, 1.0), randn(50, n, 0.01), randn(51, n, 0.01), randn(52, n, 1e-4).iter().map(|v| v.abs()).collect(), vec![0.125]], |be, [p, grad, m, v, gn]| {
            be.sum_squares(gn, grad, n).unwrap();
            be.adamw_update(p, grad, m, v, gn, n, &hp).unwrap();
        });
        assert_close(&format!("adamw clip {clip:?}"), &g, &c, RED);
    }
}

fn tiny_config() -> VitConfig {
    VitConfig { image_size: 16, channels: 3, patch: 4, width: 32, depth: 2, heads: 2, mlp: 48, classes: 10, ln_eps: 1e-6 }
}

fn random_params(cfg: &VitConfig, ranks: &Ranks, seed: u64) -> VitParams<Vec<f32>> {
    let mut rng = Rng::new(seed);
    VitParams::build(cfg, ranks, |s| {
        let v = if s.name.ends_with("norm1.weight") || s.name.ends_with("norm2.weight") || s.name == "norm.weight" {
            (0..s.numel()).map(|_| 1.0 + 0.1 * rng.normal() as f32).collect()
        } else {
            rng.normal_vec(s.numel(), 0.1)
        };
        Ok::<_, ()>(v)
    })
    .unwrap()
}

/// Loss, gradients after one forward/backward, and parameters after one step.
fn one_step<B: Backend>(be: &B, cfg: &VitConfig, ranks: &Ranks, bytes: &[u8], labels: &[u32]) -> (f32, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let t = ImageTransform { channels: 3, src_height: 20, src_width: 20, dst_size: cfg.image_size, mean: [0.5; 3], std: [0.25; 3] };
    let model = Vit::from_host(be, cfg, ranks, &random_params(cfg, ranks, 1)).unwrap();
    let mut learner = Learner::new(be, model, labels.len(), AdamWConfig::default()).unwrap();
    let loss = learner.step(be, bytes, labels, &t, TeacherSignal::None, &LossSpec::ce(), 1e-3).unwrap().loss;
    let grads = learner.grads.tensors().iter().map(|g| be.download(g).unwrap()).collect();
    let params = learner.model.params.tensors().iter().map(|p| be.download(p).unwrap()).collect();
    (loss, grads, params)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn whole_vit_step_matches_cpu() {
    let cfg = tiny_config();
    let batch = 6;
    let mut rng = Rng::new(53);
    let bytes: Vec<u8> = (0..batch * 3 * 20 * 20).map(|_| rng.below(256) as u8).collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(cfg.classes) as u32).collect();
    for ranks in [dense_ranks(&cfg), uniform_ranks(&cfg, 8)] {
        let (lc, gc, pc) = one_step(&CpuBackend::default(), &cfg, &ranks, &bytes, &labels);
        let (lg, gg, pg) = one_step(&gpu(), &cfg, &ranks, &bytes, &labels);
        assert!((lc - lg).abs() <= 1e-4 * lc.abs().max(1.0), "loss cpu {lc} gpu {lg}");
        assert_close("ViT gradients", &gg, &gc, 1e-3);
        assert_close("ViT parameters after one AdamW step", &pg, &pc, 1e-4);
    }
}
