//! Kernel benchmarks on the GPU (`cargo bench --bench kernels`): time per
//! call, achieved TFLOP/s or GB/s, and the ratio to a baseline timed in the
//! same run: two cuBLAS SGEMMs for the fused low-rank layer (M = 12,800
//! rows, width 768, r from 16 to 256), the unfused cuBLAS + softmax path for
//! attention (ViT-B/16: 197 tokens, 12 heads of 64); at ViT-B/32's 50 tokens
//! (batch 256) the short kernels (`--short-attention`) against
//! the default fused kernels, which are timed against the unfused path;
//! the fused residual add + LayerNorm (`--fused-add-layernorm`) against
//! `add` then `layernorm`. Other memory-bound kernels report GB/s against
//! none. Runs the bf16 mixed-precision device (the
//! default; baselines are bf16 cuBLAS GEMMs with fp32 accumulation), then the
//! fp32 device (baselines fp32 SGEMMs). Inputs of the low-rank rows rotate
//! over 4 sets so that they do not sit in the 50 MB L2 cache. Without a GPU
//! it says so and exits 0.

use anyhow::Result;
use effrank_engine::device::cuda::{cuda_available, CudaBuf, CudaOptions};
use effrank_engine::device::{BufKind, Cuda, Device, Precision};
use effrank_engine::ops;
use effrank_engine::ops::adamw::AdamWStep;
use effrank_engine::ops::attention::{AttentionShape, Qkv};
use effrank_engine::ops::gelu::Activation;
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::ops::layernorm::{Params, Saved};
use effrank_engine::ops::loss::LogitLossConfig;
use effrank_engine::ops::Rows;
use effrank_engine::rng::Rng;

/// `dq, dk, dv` as one `Qkv`.
fn grads<'a>(q: &'a mut CudaBuf, k: &'a mut CudaBuf, v: &'a mut CudaBuf) -> Qkv<&'a mut CudaBuf> {
    Qkv { q, k, v }
}

/// A random activation buffer.
fn buf(be: &Cuda, seed: u64, n: usize, std: f32) -> Result<CudaBuf> {
    be.upload(&Rng::new(seed).normal_vec(n, std), BufKind::Activation)
}

/// A random fp32 parameter buffer.
fn param(be: &Cuda, seed: u64, n: usize, std: f32) -> Result<CudaBuf> {
    be.upload(&Rng::new(seed).normal_vec(n, std), BufKind::Param)
}

/// Bytes of one activation element.
fn act_bytes(be: &Cuda) -> f64 {
    match be.precision() {
        Precision::F32 => 4.0,
        Precision::Bf16 => 2.0,
    }
}

struct Row {
    kernel: String,
    ms: f64,
    rate: String,
    baseline_ms: Option<f64>,
}

fn lowrank_rows(be: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let (m, width) = (12_800, 768);
    const SETS: usize = 4;
    let xs = (0..SETS)
        .map(|i| buf(be, 1 + 100 * i as u64, m * width, 1.0))
        .collect::<Result<Vec<_>>>()?;
    let mut ys = (0..SETS)
        .map(|_| be.alloc(m * width, BufKind::Activation))
        .collect::<Result<Vec<_>>>()?;
    let bias = param(be, 2, width, 1.0)?;
    for r in [16, 32, 64, 128, 256] {
        let v = param(be, 3, r * width, 0.05)?;
        let u = param(be, 4, width * r, 0.05)?;
        let mut hs = (0..SETS)
            .map(|_| be.alloc(m * r, BufKind::Activation))
            .collect::<Result<Vec<_>>>()?;
        let mut i = 0;
        let w = ops::lowrank::LowRankWeights {
            v: &v,
            u: &u,
            bias: &bias,
        };
        let s = ops::lowrank::LowRankShape {
            rows: m,
            inp: width,
            rank: r,
            out: width,
        };
        let ok = ops::lowrank::check_forward(be, &ys[0], &hs[0], &xs[0], w, s)?;
        let fused = be.median_device_seconds(40, || {
            i = (i + 1) % SETS;
            ops::lowrank::cuda::lowrank_forward_fused(be, &mut ys[i], &mut hs[i], &xs[i], w, s, ok)
        })?;
        let base = be.median_device_seconds(40, || {
            i = (i + 1) % SETS;
            ops::lowrank::cuda::unfused(be, &mut ys[i], &mut hs[i], &xs[i], w, s, ok)
        })?;
        let flops = 2.0 * m as f64 * r as f64 * (2 * width) as f64;
        let bytes = act_bytes(be) * (m * (2 * width + r)) as f64;
        rows.push(Row {
            kernel: format!("lowrank_forward r={r}"),
            ms: fused * 1e3,
            rate: format!(
                "{:.1} TFLOP/s {:.0} GB/s",
                flops / fused / 1e12,
                bytes / fused / 1e9
            ),
            baseline_ms: Some(base * 1e3),
        });
    }
    Ok(())
}

fn attention_rows(be: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let (batch, t, heads, dh) = (64, 197, 12, 64);
    let shape = AttentionShape {
        batch,
        tokens: t,
        heads,
        head_dim: dh,
    };
    let n = shape.len();
    let (q, k, v, dout) = (
        buf(be, 5, n, 1.0)?,
        buf(be, 6, n, 1.0)?,
        buf(be, 7, n, 1.0)?,
        buf(be, 8, n, 1.0)?,
    );
    let mut out = be.alloc(n, BufKind::Activation)?;
    let mut probs = be.alloc(batch * heads * t * t, BufKind::Activation)?;
    let (mut dq, mut dk, mut dv) = (
        be.alloc(n, BufKind::Activation)?,
        be.alloc(n, BufKind::Activation)?,
        be.alloc(n, BufKind::Activation)?,
    );
    let flops = 4.0 * (batch * heads) as f64 * (t * t * dh) as f64;
    let x = Qkv {
        q: &q,
        k: &k,
        v: &v,
    };
    let ok = ops::attention::check_forward(be, &out, &probs, x, shape)?;
    let f = be.median_device_seconds(10, || {
        ops::attention::cuda::fused_forward(be, &mut out, &mut probs, x, shape, ok)
    })?;
    let fb = be.median_device_seconds(10, || {
        ops::attention::cuda::unfused_forward(be, &mut out, &mut probs, x, shape, ok)
    })?;
    rows.push(Row {
        kernel: format!("attention_forward b{batch} t{t} h{heads}x{dh}"),
        ms: f * 1e3,
        rate: format!("{:.2} TFLOP/s", flops / f / 1e12),
        baseline_ms: Some(fb * 1e3),
    });
    let ok = ops::attention::check_backward(
        be,
        Qkv {
            q: &dq,
            k: &dk,
            v: &dv,
        },
        &dout,
        x,
        &probs,
        shape,
    )?;
    let b = be.median_device_seconds(10, || {
        ops::attention::cuda::fused_backward(
            be,
            grads(&mut dq, &mut dk, &mut dv),
            &dout,
            x,
            &probs,
            shape,
            ok,
        )
    })?;
    let bb = be.median_device_seconds(10, || {
        ops::attention::cuda::unfused_backward(
            be,
            grads(&mut dq, &mut dk, &mut dv),
            &dout,
            x,
            &probs,
            shape,
            ok,
        )
    })?;
    rows.push(Row {
        kernel: format!("attention_backward b{batch} t{t} h{heads}x{dh}"),
        ms: b * 1e3,
        rate: format!("{:.2} TFLOP/s", 2.0 * flops / b / 1e12),
        baseline_ms: Some(bb * 1e3),
    });
    Ok(())
}

/// ViT-B/32's attention (batch 256, 50 tokens, 12 heads of 64): the short
/// kernels against the default fused ones, and those against the unfused path.
fn short_attention_rows(be: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let (batch, t, heads, dh) = (256, 50, 12, 64);
    let shape = AttentionShape {
        batch,
        tokens: t,
        heads,
        head_dim: dh,
    };
    let n = shape.len();
    let (q, k, v, dout) = (
        buf(be, 25, n, 1.0)?,
        buf(be, 26, n, 1.0)?,
        buf(be, 27, n, 1.0)?,
        buf(be, 28, n, 1.0)?,
    );
    let mut out = be.alloc(n, BufKind::Activation)?;
    let mut probs = be.alloc(batch * heads * t * t, BufKind::Activation)?;
    let (mut dq, mut dk, mut dv) = (
        be.alloc(n, BufKind::Activation)?,
        be.alloc(n, BufKind::Activation)?,
        be.alloc(n, BufKind::Activation)?,
    );
    let flops = 4.0 * (batch * heads) as f64 * (t * t * dh) as f64;
    let label = format!("b{batch} t{t} h{heads}x{dh}");
    use ops::attention::cuda::{
        fused_backward, fused_forward, short_backward, short_forward, unfused_backward,
        unfused_forward,
    };
    let x = Qkv {
        q: &q,
        k: &k,
        v: &v,
    };
    let ok = ops::attention::check_forward(be, &out, &probs, x, shape)?;
    let short =
        be.median_device_seconds(20, || short_forward(be, &mut out, &mut probs, x, shape, ok))?;
    let fused =
        be.median_device_seconds(20, || fused_forward(be, &mut out, &mut probs, x, shape, ok))?;
    let unfused = be.median_device_seconds(10, || {
        unfused_forward(be, &mut out, &mut probs, x, shape, ok)
    })?;
    rows.push(Row {
        kernel: format!("attention_short_forward {label} vs fused"),
        ms: short * 1e3,
        rate: format!("{:.2} TFLOP/s", flops / short / 1e12),
        baseline_ms: Some(fused * 1e3),
    });
    rows.push(Row {
        kernel: format!("attention_forward (fused) {label} vs unfused"),
        ms: fused * 1e3,
        rate: format!("{:.2} TFLOP/s", flops / fused / 1e12),
        baseline_ms: Some(unfused * 1e3),
    });
    let ok = ops::attention::check_backward(
        be,
        Qkv {
            q: &dq,
            k: &dk,
            v: &dv,
        },
        &dout,
        x,
        &probs,
        shape,
    )?;
    let short = be.median_device_seconds(20, || {
        short_backward(
            be,
            grads(&mut dq, &mut dk, &mut dv),
            &dout,
            x,
            &probs,
            shape,
            ok,
        )
    })?;
    let fused = be.median_device_seconds(20, || {
        fused_backward(
            be,
            grads(&mut dq, &mut dk, &mut dv),
            &dout,
            x,
            &probs,
            shape,
            ok,
        )
    })?;
    let unfused = be.median_device_seconds(10, || {
        unfused_backward(
            be,
            grads(&mut dq, &mut dk, &mut dv),
            &dout,
            x,
            &probs,
            shape,
            ok,
        )
    })?;
    rows.push(Row {
        kernel: format!("attention_short_backward {label} vs fused"),
        ms: short * 1e3,
        rate: format!("{:.2} TFLOP/s", 2.0 * flops / short / 1e12),
        baseline_ms: Some(fused * 1e3),
    });
    rows.push(Row {
        kernel: format!("attention_backward (fused) {label} vs unfused"),
        ms: fused * 1e3,
        rate: format!("{:.2} TFLOP/s", 2.0 * flops / fused / 1e12),
        baseline_ms: Some(unfused * 1e3),
    });
    Ok(())
}

/// The fused residual add + LayerNorm at ViT-B/32's [12800, 768] against
/// `add` then `layernorm` (forward), and `layernorm` backward then a copy.
fn add_layernorm_rows(be: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let (r, c) = (256 * 50, 768);
    let n = r * c;
    let e = act_bytes(be);
    let (a, b, dout) = (
        buf(be, 40, n, 1.0)?,
        buf(be, 41, n, 1.0)?,
        buf(be, 42, n, 1.0)?,
    );
    let (gamma, beta) = (param(be, 43, c, 1.0)?, param(be, 44, c, 1.0)?);
    let (mut sum, mut out, mut dx, mut dbranch) = (
        be.alloc(n, BufKind::Activation)?,
        be.alloc(n, BufKind::Activation)?,
        buf(be, 45, n, 1.0)?,
        be.alloc(n, BufKind::Activation)?,
    );
    let (mut mean, mut rstd) = (
        be.alloc(r, BufKind::Statistic)?,
        be.alloc(r, BufKind::Statistic)?,
    );
    let (mut dgamma, mut dbeta) = (be.alloc(c, BufKind::Param)?, be.alloc(c, BufKind::Param)?);
    let gbs = |bytes: f64, s: f64| format!("{:.0} GB/s", bytes / s / 1e9);
    let fused = be.median_device_seconds(50, || {
        ops::add_layernorm::forward(
            be,
            ops::add_layernorm::Outputs {
                sum: &mut sum,
                out: &mut out,
                mean: &mut mean,
                rstd: &mut rstd,
            },
            ops::add_layernorm::Terms { a: &a, b: &b },
            Params {
                gamma: &gamma,
                beta: &beta,
            },
            Rows::new(r, c),
            1e-6,
        )
    })?;
    let plain = be.median_device_seconds(50, || {
        ops::add::add(be, &mut sum, &a, &b, n)?;
        ops::layernorm::forward(
            be,
            ops::layernorm::Outputs {
                out: &mut out,
                mean: &mut mean,
                rstd: &mut rstd,
            },
            &sum,
            Params {
                gamma: &gamma,
                beta: &beta,
            },
            Rows::new(r, c),
            1e-6,
        )
    })?;
    rows.push(Row {
        kernel: format!("add_layernorm_forward [{r}, {c}] vs add + LN"),
        ms: fused * 1e3,
        rate: gbs(4.0 * e * n as f64, fused),
        baseline_ms: Some(plain * 1e3),
    });
    let fused = be.median_device_seconds(50, || {
        ops::add_layernorm::backward(
            be,
            ops::add_layernorm::Grads {
                dx: &mut dx,
                dbranch: &mut dbranch,
                dgamma: &mut dgamma,
                dbeta: &mut dbeta,
            },
            &dout,
            Saved {
                x: &sum,
                mean: &mean,
                rstd: &rstd,
            },
            &gamma,
            Rows::new(r, c),
        )
    })?;
    let plain = be.median_device_seconds(50, || {
        ops::layernorm::backward(
            be,
            ops::layernorm::Grads {
                dx: &mut dx,
                dgamma: &mut dgamma,
                dbeta: &mut dbeta,
            },
            &dout,
            Saved {
                x: &sum,
                mean: &mean,
                rstd: &rstd,
            },
            &gamma,
            Rows::new(r, c),
        )?;
        be.copy(&mut dbranch, &dx, n)
    })?;
    rows.push(Row {
        kernel: format!("add_layernorm_backward [{r}, {c}] vs LN + copy"),
        ms: fused * 1e3,
        rate: gbs(5.0 * e * n as f64, fused),
        baseline_ms: Some(plain * 1e3),
    });
    Ok(())
}

fn memory_bound_rows(be: &Cuda, rows: &mut Vec<Row>) -> Result<()> {
    let (r, c) = (64 * 197, 768);
    let n = r * c;
    let e = act_bytes(be);
    let x = buf(be, 9, n, 1.0)?;
    let dout = buf(be, 14, n, 1.0)?;
    let (gamma, beta) = (param(be, 10, c, 1.0)?, param(be, 11, c, 1.0)?);
    let (mut dgamma, mut dbeta) = (be.alloc(c, BufKind::Param)?, be.alloc(c, BufKind::Param)?);
    let mut out = be.alloc(n, BufKind::Activation)?;
    let mut dx = be.alloc(n, BufKind::Activation)?;
    let (mut mean, mut rstd) = (
        be.alloc(r, BufKind::Statistic)?,
        be.alloc(r, BufKind::Statistic)?,
    );
    let gbs = |bytes: f64, s: f64| format!("{:.0} GB/s", bytes / s / 1e9);
    let s = be.median_device_seconds(50, || {
        ops::layernorm::forward(
            be,
            ops::layernorm::Outputs {
                out: &mut out,
                mean: &mut mean,
                rstd: &mut rstd,
            },
            &x,
            Params {
                gamma: &gamma,
                beta: &beta,
            },
            Rows::new(r, c),
            1e-6,
        )
    })?;
    rows.push(Row {
        kernel: format!("layernorm_forward [{r}, {c}]"),
        ms: s * 1e3,
        rate: gbs(2.0 * e * n as f64, s),
        baseline_ms: None,
    });
    let s = be.median_device_seconds(50, || {
        ops::layernorm::backward(
            be,
            ops::layernorm::Grads {
                dx: &mut dx,
                dgamma: &mut dgamma,
                dbeta: &mut dbeta,
            },
            &dout,
            Saved {
                x: &x,
                mean: &mean,
                rstd: &rstd,
            },
            &gamma,
            Rows::new(r, c),
        )
    })?;
    rows.push(Row {
        kernel: format!("layernorm_backward [{r}, {c}]"),
        ms: s * 1e3,
        rate: gbs(5.0 * e * n as f64, s),
        baseline_ms: None,
    });
    // Its two kernels apart: the input gradient (a warp per row) and the
    // parameter gradients (column sums).
    {
        let saved = Saved {
            x: &x,
            mean: &mean,
            rstd: &rstd,
        };
        let grads = ops::layernorm::Grads {
            dx: &mut dx,
            dgamma: &mut dgamma,
            dbeta: &mut dbeta,
        };
        let ok = ops::layernorm::check_backward(be, &grads, &dout, saved, &gamma, Rows::new(r, c))?;
        let s = be.median_device_seconds(50, || {
            ops::layernorm::cuda::backward_dx(
                be,
                grads.dx,
                &dout,
                saved,
                &gamma,
                Rows::new(r, c),
                ok,
            )
        })?;
        rows.push(Row {
            kernel: "  of which layernorm_backward_dx".into(),
            ms: s * 1e3,
            rate: gbs(4.0 * e * n as f64, s),
            baseline_ms: None,
        });
        let s = be.median_device_seconds(50, || {
            ops::layernorm::cuda::backward_params(
                be,
                grads.dgamma,
                grads.dbeta,
                &dout,
                saved,
                Rows::new(r, c),
                ok,
            )
        })?;
        rows.push(Row {
            kernel: "  of which layernorm_backward_params".into(),
            ms: s * 1e3,
            rate: gbs(2.0 * e * n as f64, s),
            baseline_ms: None,
        });
    }
    let s = be.median_device_seconds(50, || {
        ops::gelu::forward(be, &mut out, &x, n, Activation::Gelu)
    })?;
    rows.push(Row {
        kernel: format!("gelu_forward {n}"),
        ms: s * 1e3,
        rate: gbs(2.0 * e * n as f64, s),
        baseline_ms: None,
    });
    let s = be.median_device_seconds(50, || {
        ops::gelu::backward(be, &mut dx, &x, &out, &dout, n, Activation::Gelu)
    })?;
    rows.push(Row {
        kernel: format!("gelu_backward {n}"),
        ms: s * 1e3,
        rate: gbs(3.0 * e * n as f64, s),
        baseline_ms: None,
    });
    let s = be.median_device_seconds(50, || ops::add::add_assign(be, &mut out, &x, n))?;
    rows.push(Row {
        kernel: format!("add_assign {n}"),
        ms: s * 1e3,
        rate: gbs(3.0 * e * n as f64, s),
        baseline_ms: None,
    });
    let s = be.median_device_seconds(50, || {
        ops::matmul::bias_backward(be, &mut dbeta, &dout, r, c)
    })?;
    rows.push(Row {
        kernel: format!("bias_backward [{r}, {c}]"),
        ms: s * 1e3,
        rate: gbs(e * n as f64, s),
        baseline_ms: None,
    });
    // Data path: 256 CIFAR-sized byte images to 224 px, then patches.
    let (batch, size) = (256, 224);
    let t = ImageTransform {
        channels: 3,
        src_height: 32,
        src_width: 32,
        dst_size: size,
        mean: [0.5; 3],
        std: [0.25; 3],
        resize: None,
    };
    let bytes: Vec<u8> = (0..batch * 3 * 32 * 32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let img_n = batch * 3 * size * size;
    let mut images = be.alloc(img_n, BufKind::Activation)?;
    let mut patches = be.alloc(img_n, BufKind::Activation)?;
    let s = be.median_device_seconds(20, || {
        ops::image::from_bytes(be, &mut images, &bytes, batch, &t)
    })?;
    rows.push(Row {
        kernel: format!("images_from_bytes {batch}x32² -> 224² (incl. upload)"),
        ms: s * 1e3,
        rate: format!("{:.0} img/ms", batch as f64 / s / 1e3),
        baseline_ms: None,
    });
    let s = be.median_device_seconds(20, || {
        ops::embed::patch_gather(
            be,
            &mut patches,
            &images,
            ops::embed::Images {
                batch,
                channels: 3,
                size,
                patch: 32,
            },
        )
    })?;
    rows.push(Row {
        kernel: format!("patch_gather {batch}x3x224²"),
        ms: s * 1e3,
        rate: gbs(2.0 * e * img_n as f64, s),
        baseline_ms: None,
    });
    // Loss over 1000-class logits of 256 images (CE + KD + feature terms).
    let (lb, classes) = (256, 1000);
    let (s_logits, t_logits) = (
        buf(be, 15, lb * classes, 3.0)?,
        buf(be, 16, lb * classes, 3.0)?,
    );
    let mut ds = be.alloc(lb * classes, BufKind::Activation)?;
    let mut loss = be.alloc(1, BufKind::Param)?;
    let labels: Vec<u32> = (0..lb as u32).map(|i| i * 37 % classes as u32).collect();
    let cfg = LogitLossConfig {
        ce_weight: 0.5,
        label_smoothing: 0.1,
        kd_weight: 0.5,
        temperature: 4.0,
        feature_weight: 0.1,
    };
    let s = be.median_device_seconds(50, || {
        ops::loss::logit_loss(
            be,
            ops::loss::Outputs {
                ds: &mut ds,
                loss: &mut loss,
            },
            ops::loss::Logits {
                student: &s_logits,
                teacher: Some(&t_logits),
                labels: &labels,
            },
            Rows::new(lb, classes),
            &cfg,
            1.0,
        )
    })?;
    rows.push(Row {
        kernel: format!("logit_loss [{lb}, {classes}] all terms"),
        ms: s * 1e3,
        rate: gbs(3.0 * e * (lb * classes) as f64, s),
        baseline_ms: None,
    });
    let p = 86_000_000;
    let (mut param, grad) = (param(be, 12, p, 0.02)?, param(be, 13, p, 1e-3)?);
    let (mut m, mut v, mut gn) = (
        be.alloc(p, BufKind::Param)?,
        be.alloc(p, BufKind::Param)?,
        be.alloc(1, BufKind::Param)?,
    );
    let s = be.median_device_seconds(20, || ops::adamw::sum_squares(be, &mut gn, &grad, p))?;
    rows.push(Row {
        kernel: format!("sum_squares {p}"),
        ms: s * 1e3,
        rate: gbs(4.0 * p as f64, s),
        baseline_ms: None,
    });
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
        step: 1,
        max_grad_norm: Some(1.0),
    };
    let s = be.median_device_seconds(20, || {
        ops::adamw::update(
            be,
            ops::adamw::State {
                param: &mut param,
                m: &mut m,
                v: &mut v,
            },
            &grad,
            &gn,
            p,
            &hp,
        )
    })?;
    rows.push(Row {
        kernel: format!("adamw_update {p}"),
        ms: s * 1e3,
        rate: gbs(28.0 * p as f64, s),
        baseline_ms: None,
    });
    Ok(())
}

fn main() -> Result<()> {
    if !cuda_available() {
        println!("no CUDA GPU: skipping kernel benchmarks");
        return Ok(());
    }
    for precision in [Precision::Bf16, Precision::F32] {
        let be = Cuda::with_options(0, precision, CudaOptions::default())?;
        println!("\ndevice: {}", be.name());
        let mut rows = Vec::new();
        lowrank_rows(&be, &mut rows)?;
        attention_rows(&be, &mut rows)?;
        short_attention_rows(&be, &mut rows)?;
        add_layernorm_rows(&be, &mut rows)?;
        memory_bound_rows(&be, &mut rows)?;
        println!(
            "{:<52} {:>9} {:>24} {:>12} {:>8}",
            "kernel", "ms", "rate", "baseline ms", "speedup"
        );
        for r in rows {
            let (b, ratio) = match r.baseline_ms {
                Some(b) => (format!("{b:.3}"), format!("{:.2}x", b / r.ms)),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<52} {:>9.3} {:>24} {:>12} {:>8}",
                r.kernel, r.ms, r.rate, b, ratio
            );
        }
    }
    Ok(())
}
