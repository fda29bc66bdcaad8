//! Every CUDA operation against the CPU reference, through the `Backend`
//! trait, on fresh random inputs: forward and backward, overwrite and
//! accumulate semantics (outputs that are ADDED to start non-zero), fused
//! and fallback paths (low-rank rank > 256, attention past the fused
//! kernel's shared memory). Then a whole tiny ViT: forward, backward and one
//! AdamW step on both devices.
//!
//! Every check runs twice: on the fp32 backend (errors measured as
//! `max |gpu − cpu| / max |cpu|` per output buffer, tolerance 1e-5 for
//! elementwise operations and 1e-4 where the GPU sums long reductions in
//! another order), and on the bf16 mixed-precision backend (activations
//! rounded to bf16, 8 significant bits: tolerance 1e-2, 3e-2 for the whole
//! model). Each check prints its measured error.
//!
//! Tests that need a GPU are `#[ignore = "needs a CUDA GPU"]`; run them with
//! `cargo test --test cuda_ops -- --include-ignored` on a GPU machine.
#![cfg(feature = "cuda")]

use effrank_engine::backend::cuda::{cuda_available, CudaBackend, Precision};
use effrank_engine::backend::{AdamWStep, Backend, BufKind, CpuBackend, ImageTransform, LogitLossConfig};
use effrank_engine::model::params::{dense_ranks, uniform_ranks, Ranks};
use effrank_engine::model::{Vit, VitConfig, VitParams};
use effrank_engine::rng::Rng;
use effrank_engine::train::{AdamWConfig, Learner, LossSpec, TeacherSignal};

const EW: f32 = 1e-5;
const RED: f32 = 1e-4;
const BF16: f32 = 1e-2;
const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Bf16];

fn gpu(p: Precision) -> CudaBackend {
    CudaBackend::with_precision(0, p).expect("CUDA device 0")
}

/// The tolerance of a check: `fp32` on the fp32 backend, BF16 on the bf16 one.
fn tol(p: Precision, fp32: f32) -> f32 {
    match p {
        Precision::F32 => fp32,
        Precision::Bf16 => BF16,
    }
}

/// On the bf16 backend, activation inputs rounded to bf16 for both devices,
/// so the comparison measures the GPU's arithmetic, not the input rounding.
fn round_activations(p: Precision, inputs: Vec<(BufKind, Vec<f32>)>) -> Vec<(BufKind, Vec<f32>)> {
    if p == Precision::F32 {
        return inputs;
    }
    inputs.into_iter().map(|(k, v)| if k == BufKind::Activation { (k, v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()) } else { (k, v) }).collect()
}

/// Inputs of a check, each with the kind the model would allocate it as.
fn act(v: Vec<f32>) -> (BufKind, Vec<f32>) {
    (BufKind::Activation, v)
}
fn par(v: Vec<f32>) -> (BufKind, Vec<f32>) {
    (BufKind::Param, v)
}
fn stat(v: Vec<f32>) -> (BufKind, Vec<f32>) {
    (BufKind::Statistic, v)
}

fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, std)
}

/// Panics naming the buffer when `max |got − want| > tol · max |want|`;
/// prints the largest relative error.
fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_close_floor(what, got, want, tol, 0.0)
}

/// As `assert_close`, with the scale of a buffer at least `floor` times the
/// largest value of all buffers (for buffers that are zero up to rounding,
/// such as the key bias gradient, which softmax's shift invariance makes 0).
fn assert_close_floor(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: buffer count");
    let global = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: buffer {i} length");
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor * global).max(1e-20);
        let (at, err) = g.iter().zip(w).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f32), |(bi, be), (j, e)| if e > be || e.is_nan() { (j, e) } else { (bi, be) });
        assert!(err <= tol * scale && g.iter().all(|v| v.is_finite()) == w.iter().all(|v| v.is_finite()),
            "{what}: buffer {i}: max error {err:e} at {at} (gpu {}, cpu {}), scale {scale:e}, tolerance {tol:e}", g[at], w[at]);
        worst = worst.max(err / scale);
    }
    println!("{what}: max relative error {worst:.2e} (tolerance {tol:.0e})");
}

/// Uploads `inputs` to both backends, runs the body on each with the
/// buffers bound to the given names, and returns `(cpu, gpu)` downloads of
/// every buffer.
macro_rules! both {
    ($prec:expr, $inputs:expr, |$be:ident, [$($b:ident),*]| $body:block) => {{
        let inputs: Vec<(BufKind, Vec<f32>)> = round_activations($prec, $inputs);
        let cpu = CpuBackend::default();
        let cuda = gpu($prec);
        let on_cpu = {
            let $be = &cpu;
            let mut bufs: Vec<_> = inputs.iter().map(|(kind, h)| $be.upload(h, *kind).unwrap()).collect();
            {
                let [$($b),*] = bufs.as_mut_slice() else { unreachable!() };
                $body
            }
            bufs.iter().map(|b| $be.download(b).unwrap()).collect::<Vec<_>>()
        };
        let on_gpu = {
            let $be = &cuda;
            let mut bufs: Vec<_> = inputs.iter().map(|(kind, h)| $be.upload(h, *kind).unwrap()).collect();
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
    for p in PRECISIONS {
        for kind in [BufKind::Activation, BufKind::Param] {
            let k = |v| (kind, v);
            let (c, g) = both!(p, vec![k(randn(1, n, 1.0)), k(randn(2, n, 1.0)), k(randn(3, n, 1.0)), k(randn(4, n, 1.0))], |be, [a, b, z, d]| {
                if kind == BufKind::Activation {
                    be.add_assign(a, b, n - 3).unwrap();
                }
                be.zero(z, n / 2).unwrap();
                be.copy(d, b, n - 5).unwrap();
                be.write(b, &[7.0; 100]).unwrap();
            });
            // add_assign rounds its sum to bf16 on the bf16 backend.
            assert_close(&format!("memory ops {p:?} {kind:?}"), &g, &c, if p == Precision::Bf16 && kind == BufKind::Activation { 4e-3 } else { 0.0 });
        }
        let cuda = gpu(p);
        assert_eq!(cuda.len(&cuda.alloc(123, BufKind::Param).unwrap()), 123);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_all_transposes_and_accumulate() {
    let (m, n, k) = (77, 130, 301);
    for p in PRECISIONS {
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [false, true] {
                    // Activation × activation into an activation (dx = dy W with W a
                    // weight is covered by the linear test), and into an fp32 weight
                    // gradient (dW = dyᵀ x), as the model uses them.
                    for out_kind in [BufKind::Activation, BufKind::Param] {
                        let (c, g) = both!(p, vec![(out_kind, randn(5, m * n, 1.0)), act(randn(6, m * k, 1.0)), par(randn(7, k * n, 1.0))], |be, [out, a, b]| {
                            be.matmul(out, a, b, m, n, k, ta, tb, acc).unwrap();
                        });
                        assert_close(&format!("matmul {p:?} ta={ta} tb={tb} acc={acc} out {out_kind:?}"), &g, &c, tol(p, RED));
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_forward_and_bias_backward() {
    let (rows, inp, out) = (333, 96, 257);
    for p in PRECISIONS {
        let (c, g) = both!(p, vec![act(randn(8, rows * out, 1.0)), act(randn(9, rows * inp, 1.0)), par(randn(10, out * inp, 0.3)), par(randn(11, out, 1.0)), par(randn(12, out, 1.0))], |be, [y, x, w, bias, dbias]| {
            be.linear_forward(y, x, w, bias, rows, inp, out).unwrap();
            be.bias_backward(dbias, y, rows, out).unwrap();
        });
        assert_close(&format!("linear + bias backward {p:?}"), &g, &c, tol(p, RED));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn lowrank_forward_fused_and_fallback() {
    for p in PRECISIONS {
        // Ragged shapes (generic kernels), and all-multiples-of-16 shapes
        // (the aligned bf16 kernel), ranks up to the fused limit and past it.
        for (rows, inp, out) in [(1000, 192, 300), (77, 24, 10), (1600, 768, 768), (208, 3072, 768), (96, 768, 3072)] {
            for rank in [1, 3, 16, 17, 64, 100, 128, 256, 300] {
                let (c, g) = both!(p, vec![act(vec![0.0; rows * out]), act(vec![0.0; rows * rank]), act(randn(13, rows * inp, 1.0)), par(randn(14, rank * inp, 0.1)), par(randn(15, out * rank, 0.1)), par(randn(16, out, 1.0))], |be, [y, h, x, v, u, bias]| {
                    be.lowrank_forward(y, h, x, v, u, bias, rows, inp, rank, out).unwrap();
                });
                assert_close(&format!("lowrank {p:?} rows {rows} in {inp} out {out} rank {rank}"), &g, &c, tol(p, RED));
            }
        }
    }
}

/// The fused kernels themselves (the `Backend` path above picks the cuBLAS
/// pair where that is faster): generic and aligned bf16 kernels, fp32 SIMT.
#[test]
#[ignore = "needs a CUDA GPU"]
fn lowrank_fused_kernels_directly() {
    use effrank_engine::ops::lowrank::cuda::lowrank_forward_fused;
    for p in PRECISIONS {
        for (rows, inp, out) in [(1000, 192, 300), (77, 24, 10), (1600, 768, 768), (208, 3072, 768), (96, 768, 3072)] {
            for rank in [1, 3, 16, 17, 32, 64, 100, 128, 256] {
                let inputs = round_activations(p, vec![act(randn(13, rows * inp, 1.0)), par(randn(14, rank * inp, 0.1)), par(randn(15, out * rank, 0.1)), par(randn(16, out, 1.0))]);
                let cpu = CpuBackend;
                let cuda = gpu(p);
                let (mut yc, mut hc) = (vec![0.0; rows * out], vec![0.0; rows * rank]);
                cpu.lowrank_forward(&mut yc, &mut hc, &inputs[0].1, &inputs[1].1, &inputs[2].1, &inputs[3].1, rows, inp, rank, out).unwrap();
                let up = |(k, v): &(BufKind, Vec<f32>)| cuda.upload(v, *k).unwrap();
                let (x, v, u, b) = (up(&inputs[0]), up(&inputs[1]), up(&inputs[2]), up(&inputs[3]));
                let (mut y, mut h) = (cuda.upload(&vec![f32::NAN; rows * out], BufKind::Activation).unwrap(), cuda.upload(&vec![f32::NAN; rows * rank], BufKind::Activation).unwrap());
                lowrank_forward_fused(&cuda, &mut y, &mut h, &x, &v, &u, &b, rows, inp, rank, out).unwrap();
                let got = vec![cuda.download(&y).unwrap(), cuda.download(&h).unwrap()];
                assert_close(&format!("fused lowrank {p:?} rows {rows} in {inp} out {out} rank {rank}"), &got, &[yc, hc], tol(p, RED));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelu_forward_and_backward() {
    let n = 100_003;
    for p in PRECISIONS {
        let (c, g) = both!(p, vec![act(randn(17, n, 3.0)), act(vec![0.0; n]), act(randn(18, n, 1.0)), act(vec![0.0; n])], |be, [x, out, dout, dx]| {
            be.gelu_forward(out, x, n).unwrap();
            be.gelu_backward(dx, x, dout, n).unwrap();
        });
        assert_close(&format!("gelu {p:?}"), &g, &c, tol(p, EW));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn layernorm_forward_and_backward_add() {
    // Even widths take the paired-column path of the backward kernel, odd ones the scalar loop.
    for (rows, cols) in [(517, 768), (33, 45)] {
        layernorm_check(rows, cols);
    }
}

fn layernorm_check(rows: usize, cols: usize) {
    let mut x = randn(19, rows * cols, 2.0);
    for v in x.iter_mut().step_by(7) {
        *v += 5.0;
    }
    let gamma: Vec<f32> = randn(20, cols, 0.3).iter().map(|v| 1.0 + v).collect();
    for p in PRECISIONS {
        let inputs = vec![act(x.clone()), par(gamma.clone()), par(randn(21, cols, 0.5)), act(vec![0.0; rows * cols]), stat(vec![0.0; rows]), stat(vec![0.0; rows]), act(randn(22, rows * cols, 1.0)), act(randn(23, rows * cols, 1.0)), par(randn(24, cols, 1.0)), par(randn(25, cols, 1.0))];
        let (c, g) = both!(p, inputs, |be, [x, gamma, beta, out, mean, rstd, dout, dx, dgamma, dbeta]| {
            be.layernorm_forward(out, mean, rstd, x, gamma, beta, rows, cols, 1e-6).unwrap();
            be.layernorm_backward(dx, dgamma, dbeta, dout, x, mean, rstd, gamma, rows, cols).unwrap();
        });
        assert_close(&format!("layernorm {p:?} [{rows}, {cols}]"), &g, &c, tol(p, RED));
    }
}

fn check_attention(p: Precision, batch: usize, tokens: usize, heads: usize, head_dim: usize) {
    check_attention_tol(p, batch, tokens, heads, head_dim, tol(p, RED))
}

fn check_attention_tol(p: Precision, batch: usize, tokens: usize, heads: usize, head_dim: usize, tolerance: f32) {
    let n = batch * tokens * heads * head_dim;
    let pn = batch * heads * tokens * tokens;
    let inputs = vec![act(randn(26, n, 1.0)), act(randn(27, n, 1.0)), act(randn(28, n, 1.0)), act(vec![0.0; n]), act(vec![0.0; pn]), act(randn(29, n, 1.0)), act(randn(30, n, 1.0)), act(randn(31, n, 1.0)), act(randn(32, n, 1.0))];
    let (c, g) = both!(p, inputs, |be, [q, k, v, out, probs, dout, dq, dk, dv]| {
        be.attention_forward(out, probs, q, k, v, batch, tokens, heads, head_dim).unwrap();
        be.attention_backward(dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim).unwrap();
    });
    assert_close(&format!("attention {p:?} b{batch} t{tokens} h{heads} dh{head_dim}"), &g, &c, tolerance);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_fused_vit_shapes() {
    for p in PRECISIONS {
        check_attention(p, 2, 197, 3, 64);
        check_attention(p, 3, 17, 2, 8);
        check_attention(p, 1, 65, 1, 128);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_unfused_fallback_for_long_sequences() {
    // The unfused path stores the scores S = q kᵀ/√dh in the activation
    // type between the GEMM and the softmax: in bf16 a score near 4 is off by
    // up to 2^-7, which moves its probability by up to 1.6%, so the bf16
    // tolerance here is 2e-2 (the fused kernels keep S in fp32).
    for p in PRECISIONS {
        let t = if p == Precision::Bf16 { 2e-2 } else { RED };
        check_attention_tol(p, 2, 300, 2, 64, t);
        check_attention_tol(p, 1, 256, 2, 128, t);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_and_pooling_forward_and_backward() {
    let (batch, channels, size, patch, width) = (3, 3, 32, 8, 40);
    let np = (size / patch) * (size / patch);
    let t = np + 1;
    for p in PRECISIONS {
        let inputs = vec![
            act(randn(33, batch * channels * size * size, 1.0)),
            act(vec![0.0; batch * channels * size * size]),
            act(randn(34, batch * np * width, 1.0)),
            par(randn(35, width, 1.0)),
            par(randn(36, t * width, 1.0)),
            act(vec![0.0; batch * t * width]),
            act(randn(37, batch * t * width, 1.0)),
            act(randn(38, batch * np * width, 1.0)),
            par(randn(39, width, 1.0)),
            par(randn(40, t * width, 1.0)),
            act(vec![0.0; batch * width]),
            act(randn(41, batch * width, 1.0)),
        ];
        let (c, g) = both!(p, inputs, |be, [images, patches, patch_out, cls, pos, x, dx, dpatch, dcls, dpos, pooled, dpooled]| {
            be.patch_gather(patches, images, batch, channels, size, patch).unwrap();
            be.tokens_forward(x, patch_out, cls, pos, batch, np, width).unwrap();
            be.tokens_backward(dpatch, dcls, dpos, dx, batch, np, width).unwrap();
            be.cls_gather(pooled, x, batch, t, width).unwrap();
            be.cls_scatter_add(dx, dpooled, batch, t, width).unwrap();
        });
        assert_close(&format!("embed {p:?}"), &g, &c, tol(p, EW));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn images_from_bytes_resize_and_normalize() {
    for p in PRECISIONS {
        for (h, w, s) in [(32, 32, 24), (20, 27, 37), (16, 16, 16)] {
            let batch = 2;
            let t = ImageTransform { channels: 3, src_height: h, src_width: w, dst_size: s, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
            let mut rng = Rng::new(42);
            let bytes: Vec<u8> = (0..batch * 3 * h * w).map(|_| rng.below(256) as u8).collect();
            let (c, g) = both!(p, vec![act(vec![0.0; batch * 3 * s * s])], |be, [out]| {
                be.images_from_bytes(out, &bytes, batch, &t).unwrap();
            });
            assert_close(&format!("images {p:?} {h}x{w} -> {s}"), &g, &c, tol(p, EW));
        }
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
    for p in PRECISIONS {
        for cfg in configs {
            let (c, g) = both!(p, vec![act(randn(44, batch * classes, 3.0)), act(randn(45, batch * classes, 3.0)), act(vec![0.0; batch * classes]), par(vec![0.25])], |be, [s, t, ds, loss]| {
                be.logit_loss(ds, loss, s, Some(t), &labels, batch, classes, &cfg, 0.5).unwrap();
            });
            assert_close(&format!("logit loss {p:?} {cfg:?}"), &g, &c, tol(p, RED));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn feature_loss_adds() {
    let (rows, cols) = (197 * 3, 192);
    for p in PRECISIONS {
        let (c, g) = both!(p, vec![act(randn(46, rows * cols, 1.0)), act(randn(47, rows * cols, 1.0)), act(randn(48, rows * cols, 1e-3)), par(vec![1.5])], |be, [s, t, ds, loss]| {
            be.feature_loss(ds, loss, s, t, rows, cols, 0.7).unwrap();
        });
        assert_close(&format!("feature loss {p:?}"), &g, &c, tol(p, RED));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sum_squares_and_adamw_with_and_without_clipping() {
    let n = 300_001;
    for p in PRECISIONS {
        for clip in [None, Some(0.5), Some(1e6)] {
            let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, step: 3, max_grad_norm: clip };
            let (c, g) = both!(p, vec![par(randn(49, n, 1.0)), par(randn(50, n, 0.01)), par(randn(51, n, 0.01)), par(randn(52, n, 1e-4).iter().map(|v| v.abs()).collect()), par(vec![0.125])], |be, [w, grad, m, v, gn]| {
                be.sum_squares(gn, grad, n).unwrap();
                be.adamw_update(w, grad, m, v, gn, n, &hp).unwrap();
            });
            // Everything here is fp32 on both backends.
            assert_close(&format!("adamw {p:?} clip {clip:?}"), &g, &c, RED);
        }
    }
}

/// The bf16 copy of a weight follows its fp32 master: after an AdamW step
/// (which rewrites the copy) and after a plain write (which marks it stale),
/// a product with the weight matches the CPU's product with the new values.
#[test]
#[ignore = "needs a CUDA GPU"]
fn weight_bf16_copy_follows_updates() {
    let (rows, inp, out) = (64, 48, 40);
    let hp = AdamWStep { lr: 1e-1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, max_grad_norm: None };
    let inputs = vec![act(vec![0.0; rows * out]), act(randn(60, rows * inp, 1.0)), par(randn(61, out * inp, 0.3)), par(vec![0.0; out]), par(randn(62, out * inp, 1.0)), par(vec![0.0; out * inp]), par(vec![0.0; out * inp]), par(vec![0.0])];
    let (c, g) = both!(Precision::Bf16, inputs, |be, [y, x, w, bias, grad, m, v, gn]| {
        be.linear_forward(y, x, w, bias, rows, inp, out).unwrap();
        be.adamw_update(w, grad, m, v, gn, out * inp, &hp).unwrap();
        be.linear_forward(y, x, w, bias, rows, inp, out).unwrap();
        // Keep the product after the step (its first row) in `bias`, one of
        // the compared buffers, before overwriting y.
        let y_after_step = be.download(y).unwrap();
        be.write(w, &randn(63, out * inp, 0.3)).unwrap();
        be.linear_forward(y, x, w, bias, rows, inp, out).unwrap();
        be.write(bias, &y_after_step[..out]).unwrap();
    });
    assert_close("bf16 weight copy after AdamW and write", &g, &c, BF16);
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
        for ranks in [dense_ranks(&cfg), uniform_ranks(&cfg, 8)] {
            let (lc, gc, pc) = one_step(&CpuBackend, &cfg, &ranks, &bytes, &labels);
            let (lg, gg, pg) = one_step(&gpu(p), &cfg, &ranks, &bytes, &labels);
            println!("{p:?}: loss cpu {lc} gpu {lg}");
            assert!((lc - lg).abs() <= loss_tol * lc.abs().max(1.0), "{p:?}: loss cpu {lc} gpu {lg}");
            assert_close_floor(&format!("ViT gradients {p:?}"), &gg, &gc, grad_tol, floor);
            // AdamW moves a weight by about lr · g/|g|: where the gradient is
            // zero up to rounding (the key bias: softmax ignores a constant
            // shift of the scores), its direction is rounding noise on both
            // devices, so those tensors are left out of the parameter check.
            let global = gc.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            let keep: Vec<usize> = (0..gc.len()).filter(|&i| gc[i].iter().fold(0f32, |m, v| m.max(v.abs())) > 1e-4 * global).collect();
            println!("{p:?}: {} of {} parameter tensors have a non-degenerate gradient", keep.len(), gc.len());
            assert!(keep.len() + 2 * cfg.depth >= gc.len(), "{p:?}: too many tensors with zero gradient");
            let pick = |v: &[Vec<f32>]| keep.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
            match p {
                Precision::F32 => assert_close(&format!("ViT parameters after one AdamW step {p:?}"), &pick(&pg), &pick(&pc), param_tol),
                Precision::Bf16 => {
                    // At step 1 AdamW moves every weight by lr · g/(|g| + eps):
                    // where bf16 noise flips the sign of a tiny gradient element
                    // the two updates differ by up to 2 lr, never more.
                    let lr = 1e-3f32;
                    let worst = pg.iter().flatten().zip(pc.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    println!("{p:?}: parameters after one AdamW step differ by at most {worst:.2e} (bound 2.05 lr = {:.2e})", 2.05 * lr);
                    assert!(worst <= 2.05 * lr, "{p:?}: parameters after one step differ by {worst:e} > 2.05 lr");
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
    let bytes: Vec<u8> = (0..batch * 3 * 20 * 20).map(|_| rng.below(256) as u8).collect();
    let t = ImageTransform { channels: 3, src_height: 20, src_width: 20, dst_size: cfg.image_size, mean: [0.5; 3], std: [0.25; 3] };
    for p in PRECISIONS {
        for ranks in [dense_ranks(&cfg), uniform_ranks(&cfg, 8)] {
            let cpu = CpuBackend;
            let model = Vit::from_host(&cpu, &cfg, &ranks, &random_params(&cfg, &ranks, 2)).unwrap();
            let mut acts = model.new_acts(&cpu, batch).unwrap();
            cpu.images_from_bytes(&mut acts.images, &bytes, batch, &t).unwrap();
            model.forward(&cpu, &mut acts, batch).unwrap();
            let want = cpu.download(&acts.logits).unwrap();

            let gpu = gpu(p);
            let model = Vit::from_host(&gpu, &cfg, &ranks, &random_params(&cfg, &ranks, 2)).unwrap();
            let mut acts = model.new_acts(&gpu, batch).unwrap();
            gpu.images_from_bytes(&mut acts.images, &bytes, batch, &t).unwrap();
            model.forward_logits(&gpu, &mut acts, batch).unwrap();
            let got = gpu.download(&acts.logits).unwrap();
            // bf16: the whole model's tolerance (see `whole_vit_step_matches_cpu`).
            let tolerance = match p {
                Precision::F32 => RED,
                Precision::Bf16 => 3e-2,
            };
            assert_close(&format!("logits-only forward {p:?}"), &[got], &[want], tolerance);
        }
    }
}
