//! The CPU backend: fp32 `Vec<f32>` buffers, each operation in
//! `src/ops/<op>/cpu.rs` (rayon across rows, images and heads;
//! faer's matmul for every matrix product). It is the reference every
//! CUDA kernel is tested against, and deterministic: the same inputs give the
//! same bits whatever the thread count.

use super::{AdamWStep, Backend, BufKind, ImageTransform, LogitLossConfig};
use crate::ops;
use crate::ops::simd::ELEMENTWISE_CHUNK;
use anyhow::{bail, Result};

/// The CPU reference backend.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// Runs `f` on one of rayon's worker threads and returns its result (runs it
/// in place when already on one). The CPU backend's operations are parallel
/// loops; started from a thread outside the pool, such as the program's main
/// thread, each one hands its work to the pool and puts the caller to sleep
/// until it is done, two thread wake-ups per operation and hundreds per
/// forward pass. Started on a worker, the caller takes part in its own loop.
/// The command line and the benches run their work through this (a
/// few percent on the ViT-B/32 forward at batch 8, within this machine's
/// run-to-run noise, so no number is claimed).
pub fn on_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

fn check(name: &str, buf: &[f32], need: usize) -> Result<()> {
    if buf.len() < need {
        bail!("{name}: buffer of {} elements, the operation needs {need}", buf.len());
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc(&self, len: usize, _kind: BufKind) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| anyhow::anyhow!("out of host memory allocating {len} floats ({:.1} GiB)", len as f64 * 4.0 / (1u64 << 30) as f64))?;
        v.resize(len, 0.0);
        Ok(v)
    }
    fn upload(&self, host: &[f32], _kind: BufKind) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        check("write", buf, host.len())?;
        buf[..host.len()].copy_from_slice(host);
        Ok(())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn zero(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        check("zero", buf, len)?;
        buf[..len].fill(0.0);
        Ok(())
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<()> {
        check("copy", dst, len)?;
        check("copy", src, len)?;
        dst[..len].copy_from_slice(&src[..len]);
        Ok(())
    }
    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<()> {
        use rayon::prelude::*;
        check("add_assign", dst, len)?;
        check("add_assign", src, len)?;
        dst[..len].par_chunks_mut(ELEMENTWISE_CHUNK).zip(src[..len].par_chunks(ELEMENTWISE_CHUNK)).for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
        Ok(())
    }
    fn add(&self, dst: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>, len: usize) -> Result<()> {
        use rayon::prelude::*;
        check("add dst", dst, len)?;
        check("add a", a, len)?;
        check("add b", b, len)?;
        let (a, b) = (&a[..len], &b[..len]);
        dst[..len].par_chunks_mut(ELEMENTWISE_CHUNK).zip(a.par_chunks(ELEMENTWISE_CHUNK)).zip(b.par_chunks(ELEMENTWISE_CHUNK)).for_each(|((d, a), b)| {
            for ((d, a), b) in d.iter_mut().zip(a).zip(b) {
                *d = a + b;
            }
        });
        Ok(())
    }

    fn matmul(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> Result<()> {
        check("matmul out", out, m * n)?;
        check("matmul a", a, m * k)?;
        check("matmul b", b, k * n)?;
        ops::matmul::cpu::matmul(out, a, b, m, n, k, trans_a, trans_b, accumulate);
        Ok(())
    }
    fn linear_forward(&self, y: &mut Vec<f32>, x: &Vec<f32>, w: &Vec<f32>, bias: &Vec<f32>, rows: usize, inp: usize, out: usize) -> Result<()> {
        check("linear y", y, rows * out)?;
        check("linear x", x, rows * inp)?;
        check("linear w", w, out * inp)?;
        check("linear bias", bias, out)?;
        ops::matmul::cpu::linear_forward(y, x, w, bias, rows, inp, out);
        Ok(())
    }
    fn lowrank_forward(&self, y: &mut Vec<f32>, h: &mut Vec<f32>, x: &Vec<f32>, v: &Vec<f32>, u: &Vec<f32>, bias: &Vec<f32>, rows: usize, inp: usize, rank: usize, out: usize) -> Result<()> {
        check("lowrank y", y, rows * out)?;
        check("lowrank h", h, rows * rank)?;
        check("lowrank x", x, rows * inp)?;
        check("lowrank v", v, rank * inp)?;
        check("lowrank u", u, out * rank)?;
        check("lowrank bias", bias, out)?;
        ops::lowrank::cpu::lowrank_forward(y, h, x, v, u, bias, rows, inp, rank, out);
        Ok(())
    }
    fn bias_backward(&self, dbias: &mut Vec<f32>, dy: &Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        check("bias_backward dbias", dbias, cols)?;
        check("bias_backward dy", dy, rows * cols)?;
        ops::matmul::cpu::bias_backward(dbias, dy, rows, cols);
        Ok(())
    }

    fn gelu_forward(&self, out: &mut Vec<f32>, x: &Vec<f32>, len: usize) -> Result<()> {
        check("gelu out", out, len)?;
        check("gelu x", x, len)?;
        ops::gelu::cpu::gelu_forward(out, x, len);
        Ok(())
    }
    fn gelu_backward(&self, dx: &mut Vec<f32>, x: &Vec<f32>, dout: &Vec<f32>, len: usize) -> Result<()> {
        check("gelu dx", dx, len)?;
        check("gelu x", x, len)?;
        check("gelu dout", dout, len)?;
        ops::gelu::cpu::gelu_backward(dx, x, dout, len);
        Ok(())
    }

    fn layernorm_forward(&self, out: &mut Vec<f32>, mean: &mut Vec<f32>, rstd: &mut Vec<f32>, x: &Vec<f32>, gamma: &Vec<f32>, beta: &Vec<f32>, rows: usize, cols: usize, eps: f32) -> Result<()> {
        check("layernorm out", out, rows * cols)?;
        check("layernorm x", x, rows * cols)?;
        check("layernorm mean", mean, rows)?;
        check("layernorm rstd", rstd, rows)?;
        check("layernorm gamma", gamma, cols)?;
        check("layernorm beta", beta, cols)?;
        ops::layernorm::cpu::layernorm_forward(out, mean, rstd, x, gamma, beta, rows, cols, eps);
        Ok(())
    }
    fn layernorm_backward(&self, dx: &mut Vec<f32>, dgamma: &mut Vec<f32>, dbeta: &mut Vec<f32>, dout: &Vec<f32>, x: &Vec<f32>, mean: &Vec<f32>, rstd: &Vec<f32>, gamma: &Vec<f32>, rows: usize, cols: usize) -> Result<()> {
        check("layernorm dx", dx, rows * cols)?;
        check("layernorm dout", dout, rows * cols)?;
        check("layernorm dgamma", dgamma, cols)?;
        check("layernorm dbeta", dbeta, cols)?;
        ops::layernorm::cpu::layernorm_backward(dx, dgamma, dbeta, dout, x, mean, rstd, gamma, rows, cols);
        Ok(())
    }

    fn attention_forward(&self, out: &mut Vec<f32>, probs: &mut Vec<f32>, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let n = batch * tokens * heads * head_dim;
        check("attention q", q, n)?;
        check("attention k", k, n)?;
        check("attention v", v, n)?;
        ops::attention::cpu::attention_forward(out, probs, q, k, v, batch, tokens, heads, head_dim);
        Ok(())
    }
    fn attention_backward(&self, dq: &mut Vec<f32>, dk: &mut Vec<f32>, dv: &mut Vec<f32>, dout: &Vec<f32>, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, probs: &Vec<f32>, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let n = batch * tokens * heads * head_dim;
        check("attention dout", dout, n)?;
        check("attention q", q, n)?;
        check("attention k", k, n)?;
        check("attention v", v, n)?;
        ops::attention::cpu::attention_backward(dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim);
        Ok(())
    }

    fn patch_gather(&self, patches: &mut Vec<f32>, images: &Vec<f32>, batch: usize, channels: usize, size: usize, patch: usize) -> Result<()> {
        check("patch_gather images", images, batch * channels * size * size)?;
        check("patch_gather patches", patches, batch * channels * size * size)?;
        ops::embed::cpu::patch_gather(patches, images, batch, channels, size, patch);
        Ok(())
    }
    fn tokens_forward(&self, x: &mut Vec<f32>, patch_out: &Vec<f32>, cls: &Vec<f32>, pos: &Vec<f32>, batch: usize, n_patches: usize, width: usize) -> Result<()> {
        check("tokens x", x, batch * (n_patches + 1) * width)?;
        check("tokens patch_out", patch_out, batch * n_patches * width)?;
        check("tokens pos", pos, (n_patches + 1) * width)?;
        ops::embed::cpu::tokens_forward(x, patch_out, cls, pos, batch, n_patches, width);
        Ok(())
    }
    fn tokens_backward(&self, dpatch_out: &mut Vec<f32>, dcls: &mut Vec<f32>, dpos: &mut Vec<f32>, dx: &Vec<f32>, batch: usize, n_patches: usize, width: usize) -> Result<()> {
        check("tokens dx", dx, batch * (n_patches + 1) * width)?;
        check("tokens dpatch_out", dpatch_out, batch * n_patches * width)?;
        check("tokens dpos", dpos, (n_patches + 1) * width)?;
        ops::embed::cpu::tokens_backward(dpatch_out, dcls, dpos, dx, batch, n_patches, width);
        Ok(())
    }
    fn cls_gather(&self, out: &mut Vec<f32>, x: &Vec<f32>, batch: usize, tokens: usize, width: usize) -> Result<()> {
        check("cls_gather x", x, batch * tokens * width)?;
        check("cls_gather out", out, batch * width)?;
        ops::embed::cpu::cls_gather(out, x, batch, tokens, width);
        Ok(())
    }
    fn cls_scatter_add(&self, dx: &mut Vec<f32>, dout: &Vec<f32>, batch: usize, tokens: usize, width: usize) -> Result<()> {
        check("cls_scatter dx", dx, batch * tokens * width)?;
        check("cls_scatter dout", dout, batch * width)?;
        ops::embed::cpu::cls_scatter_add(dx, dout, batch, tokens, width);
        Ok(())
    }

    fn images_from_bytes(&self, out: &mut Vec<f32>, src: &[u8], batch: usize, t: &ImageTransform) -> Result<()> {
        if src.len() < batch * t.channels * t.src_height * t.src_width {
            bail!("images_from_bytes: {} bytes for {batch} images of {}x{}x{}", src.len(), t.channels, t.src_height, t.src_width);
        }
        check("images_from_bytes out", out, batch * t.channels * t.dst_size * t.dst_size)?;
        ops::image::cpu::images_from_bytes(out, src, batch, t);
        Ok(())
    }

    fn logit_loss(&self, ds: &mut Vec<f32>, loss: &mut Vec<f32>, s: &Vec<f32>, teacher: Option<&Vec<f32>>, labels: &[u32], batch: usize, classes: usize, cfg: &LogitLossConfig, scale: f32) -> Result<()> {
        check("logit_loss s", s, batch * classes)?;
        check("logit_loss ds", ds, batch * classes)?;
        if (cfg.kd_weight != 0.0 || cfg.feature_weight != 0.0) && teacher.is_none() {
            bail!("logit_loss: the KD or feature term needs teacher logits");
        }
        if let Some(t) = teacher {
            check("logit_loss teacher", t, batch * classes)?;
        }
        if cfg.ce_weight != 0.0 {
            if labels.len() < batch {
                bail!("logit_loss: {} labels for a batch of {batch}", labels.len());
            }
            if let Some(&bad) = labels[..batch].iter().find(|&&y| y as usize >= classes) {
                bail!("logit_loss: label {bad} out of range for {classes} classes");
            }
        }
        ops::loss::cpu::logit_loss(ds, loss, s, teacher.map(|t| t.as_slice()), labels, batch, classes, cfg, scale);
        Ok(())
    }
    fn feature_loss(&self, ds: &mut Vec<f32>, loss: &mut Vec<f32>, s: &Vec<f32>, t: &Vec<f32>, rows: usize, cols: usize, scale: f32) -> Result<()> {
        check("feature_loss s", s, rows * cols)?;
        check("feature_loss t", t, rows * cols)?;
        check("feature_loss ds", ds, rows * cols)?;
        ops::loss::cpu::feature_loss(ds, loss, s, t, rows, cols, scale);
        Ok(())
    }

    fn sum_squares(&self, acc: &mut Vec<f32>, x: &Vec<f32>, len: usize) -> Result<()> {
        check("sum_squares x", x, len)?;
        ops::adamw::cpu::sum_squares(acc, x, len);
        Ok(())
    }
    fn adamw_update(&self, param: &mut Vec<f32>, grad: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, grad_norm_sq: &Vec<f32>, len: usize, hp: &AdamWStep) -> Result<()> {
        for (name, b) in [("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)] {
            check(name, b, len)?;
        }
        ops::adamw::cpu::adamw_update(param, grad, m, v, grad_norm_sq[0], len, hp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The one-pass `add` writes a + b over several rayon chunks and a
    /// ragged tail, and nothing past `len`.
    #[test]
    fn add_writes_the_sum_and_nothing_past_len() {
        let be = CpuBackend;
        let len = 3 * ELEMENTWISE_CHUNK + 17;
        let mut rng = Rng::new(3);
        let a = rng.normal_vec(len + 5, 1.0);
        let b = rng.normal_vec(len + 5, 1.0);
        let mut dst = vec![f32::NAN; len + 5];
        be.add(&mut dst, &a, &b, len).unwrap();
        for i in 0..len {
            assert_eq!(dst[i], a[i] + b[i], "element {i}");
        }
        assert!(dst[len..].iter().all(|v| v.is_nan()), "wrote past len");
        assert!(be.add(&mut dst, &a, &b, len + 6).is_err(), "a length past the buffers must be an error");
    }
}
