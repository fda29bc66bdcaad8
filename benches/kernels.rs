//! Kernel benchmarks on the GPU (`cargo bench --bench kernels`): time per
//! call, achieved TFLOP/s or GB/s, and the ratio to a baseline timed in the
//! same run: two cuBLAS SGEMMs for the fused low-rank layer (M = 12,800
//! rows, width 768, r from 16 to 256), the unfused cuBLAS + softmax path for
//! attention (ViT-B/16: 197 tokens, 12 heads of 64). Memory-bound kernels
//! report GB/s against none. Without a GPU it says so and exits 0.

use anyhow::Result;
use effrank_engine::backend::cuda::{cuda_available, CudaBackend};
use effrank_engine::backend::{AdamWStep, Backend, BufKind};
use effrank_engine::ops;
use effrank_engine::rng::Rng;
use std::time::Instant;

/// Mean seconds per call of `f` over `iters` calls after 3 warm-up calls.
fn time(be: &CudaBackend, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    be.stream().synchronize().map_err(|e| anyhow::anyhow!("synchronize: {e:?}"))?;
    let start = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    be.stream().synchronize().map_err(|e| anyhow::anyhow!("synchronize: {e:?}"))?;
    Ok(start.elapsed().as_secs_f64() / iters as f64)
}

fn buf(be: &CudaBackend, seed: u64, n: usize, std: f32) -> Result<<CudaBackend as Backend>::Buf> {
    be.upload(&Rng::new(seed).normal_vec(n, std), BufKind::Activation)
}

struct Row {
    kernel: String,
    ms: f64,
    rate: String,
    baseline_ms: Option<f64>,
}

fn lowrank_rows(be: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    let (m, width) = (12_800, 768);
    let x = buf(be, 1, m * width, 1.0)?;
    let bias = buf(be, 2, width, 1.0)?;
    let mut y = be.alloc(m * width, BufKind::Activation)?;
    for r in [16, 32, 64, 128, 256] {
        let v = buf(be, 3, r * width, 0.05)?;
        let u = buf(be, 4, width * r, 0.05)?;
        let mut h = be.alloc(m * r, BufKind::Activation)?;
        let fused = time(be, 20, || ops::lowrank::cuda::lowrank_forward(be, &mut y, &mut h, &x, &v, &u, &bias, m, width, r, width))?;
        let base = time(be, 20, || ops::lowrank::cuda::unfused(be, &mut y, &mut h, &x, &v, &u, &bias, m, width, r, width))?;
        let flops = 2.0 * m as f64 * r as f64 * (2 * width) as f64;
        rows.push(Row { kernel: format!("lowrank_forward r={r}"), ms: fused * 1e3, rate: format!("{:.2} TFLOP/s", flops / fused / 1e12), baseline_ms: Some(base * 1e3) });
    }
    Ok(())
}

fn attention_rows(be: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    let (batch, t, heads, dh) = (64, 197, 12, 64);
    let n = batch * t * heads * dh;
    let (q, k, v, dout) = (buf(be, 5, n, 1.0)?, buf(be, 6, n, 1.0)?, buf(be, 7, n, 1.0)?, buf(be, 8, n, 1.0)?);
    let mut out = be.alloc(n, BufKind::Activation)?;
    let mut probs = be.alloc(batch * heads * t * t, BufKind::Activation)?;
    let (mut dq, mut dk, mut dv) = (be.alloc(n, BufKind::Activation)?, be.alloc(n, BufKind::Activation)?, be.alloc(n, BufKind::Activation)?);
    let flops = 4.0 * (batch * heads) as f64 * (t * t * dh) as f64;
    let f = time(be, 10, || ops::attention::cuda::attention_forward(be, &mut out, &mut probs, &q, &k, &v, batch, t, heads, dh))?;
    let fb = time(be, 10, || ops::attention::cuda::unfused_forward(be, &mut out, &mut probs, &q, &k, &v, batch, t, heads, dh))?;
    rows.push(Row { kernel: format!("attention_forward b{batch} t{t} h{heads}x{dh}"), ms: f * 1e3, rate: format!("{:.2} TFLOP/s", flops / f / 1e12), baseline_ms: Some(fb * 1e3) });
    let b = time(be, 10, || ops::attention::cuda::attention_backward(be, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, batch, t, heads, dh))?;
    let bb = time(be, 10, || ops::attention::cuda::unfused_backward(be, &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, batch, t, heads, dh))?;
    rows.push(Row { kernel: format!("attention_backward b{batch} t{t} h{heads}x{dh}"), ms: b * 1e3, rate: format!("{:.2} TFLOP/s", 2.0 * flops / b / 1e12), baseline_ms: Some(bb * 1e3) });
    Ok(())
}

fn memory_bound_rows(be: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    let (r, c) = (64 * 197, 768);
    let n = r * c;
    let x = buf(be, 9, n, 1.0)?;
    let (gamma, beta) = (buf(be, 10, c, 1.0)?, buf(be, 11, c, 1.0)?);
    let mut out = be.alloc(n, BufKind::Activation)?;
    let (mut mean, mut rstd) = (be.alloc(r, BufKind::Activation)?, be.alloc(r, BufKind::Activation)?);
    let gbs = |bytes: f64, s: f64| format!("{:.0} GB/s", bytes / s / 1e9);
    let s = time(be, 50, || be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &gamma, &beta, r, c, 1e-6))?;
    rows.push(Row { kernel: format!("layernorm_forward [{r}, {c}]"), ms: s * 1e3, rate: gbs(8.0 * n as f64, s), baseline_ms: None });
    let s = time(be, 50, || be.gelu_forward(&mut out, &x, n))?;
    rows.push(Row { kernel: format!("gelu_forward {n}"), ms: s * 1e3, rate: gbs(8.0 * n as f64, s), baseline_ms: None });
    let p = 86_000_000;
    let (mut param, grad) = (buf(be, 12, p, 0.02)?, buf(be, 13, p, 1e-3)?);
    let (mut m, mut v, mut gn) = (be.alloc(p, BufKind::Param)?, be.alloc(p, BufKind::Param)?, be.alloc(1, BufKind::Param)?);
    let s = time(be, 20, || be.sum_squares(&mut gn, &grad, p))?;
    rows.push(Row { kernel: format!("sum_squares {p}"), ms: s * 1e3, rate: gbs(4.0 * p as f64, s), baseline_ms: None });
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, step: 1, max_grad_norm: Some(1.0) };
    let s = time(be, 20, || be.adamw_update(&mut param, &grad, &mut m, &mut v, &gn, p, &hp))?;
    rows.push(Row { kernel: format!("adamw_update {p}"), ms: s * 1e3, rate: gbs(28.0 * p as f64, s), baseline_ms: None });
    Ok(())
}

fn main() -> Result<()> {
    if !cuda_available() {
        println!("no CUDA GPU: skipping kernel benchmarks");
        return Ok(());
    }
    let be = CudaBackend::new(0)?;
    println!("device: {}", be.name());
    let mut rows = Vec::new();
    lowrank_rows(&be, &mut rows)?;
    attention_rows(&be, &mut rows)?;
    memory_bound_rows(&be, &mut rows)?;
    println!("{:<44} {:>10} {:>14} {:>13} {:>8}", "kernel", "ms", "rate", "baseline ms", "speedup");
    for r in rows {
        let (b, ratio) = match r.baseline_ms {
            Some(b) => (format!("{b:.3}"), format!("{:.2}x", b / r.ms)),
            None => ("-".into(), "-".into()),
        };
        println!("{:<44} {:>10.3} {:>14} {:>13} {:>8}", r.kernel, r.ms, r.rate, b, ratio);
    }
    Ok(())
}
