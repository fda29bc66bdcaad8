//! Multi-head self-attention core (Vaswani et al.), per image and head,
//! with `q, k, v, o: [T, dh]` the head's columns and `s = 1/√dh`:
//!
//! ```text
//! forward   P = softmax_rows(s · q kᵀ),  o = P v
//! backward  dP = do vᵀ,  dv = Pᵀ do,
//!           dS = P ∘ (dP − rowsum(dP ∘ P)),  dq = s · dS k,  dk = s · dSᵀ q
//! ```
//! `P` is kept for the backward pass.
//!
//! The class token's query alone (`class_token_forward`, `_backward`): the
//! training tail's last block (`model::vit`), where only the class token's
//! row of the output reaches the loss. The same formulas with one query
//! row: `q, o, dq: [1, dh]` per image and head, `P: [1, T]`, while `k, v,
//! dk, dv` keep every token (each key and value still gets a gradient).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Device bodies of attention (call `forward` / `backward`).
pub trait AttentionKernel: Device {
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn class_token_attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn class_token_attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()>;
}

/// Elements of one `[batch, tokens, heads·head_dim]` tensor and of the
/// probabilities `[batch, heads, tokens, tokens]`.
fn sizes(batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<(usize, usize)> {
    Ok((
        product("attention", &[batch, tokens, heads, head_dim])?,
        product("attention probs", &[batch, heads, tokens, tokens])?,
    ))
}

/// The checks of `forward`, for callers that pick a device's path
/// themselves (the CUDA benches): the token they need to call it.
#[allow(clippy::too_many_arguments)]
pub fn check_forward<D: Device>(
    dev: &D,
    out: &D::Buf,
    probs: &D::Buf,
    q: &D::Buf,
    k: &D::Buf,
    v: &D::Buf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Checked> {
    let (n, pn) = sizes(batch, tokens, heads, head_dim)?;
    for (name, b) in [
        ("attention q", q),
        ("attention k", k),
        ("attention v", v),
        ("attention out", out),
    ] {
        need(dev, name, b, n)?;
    }
    need(dev, "attention probs", probs, pn)?;
    Ok(Checked::new())
}

/// The checks of `backward` (see `check_forward`).
#[allow(clippy::too_many_arguments)]
pub fn check_backward<D: Device>(
    dev: &D,
    dq: &D::Buf,
    dk: &D::Buf,
    dv: &D::Buf,
    dout: &D::Buf,
    q: &D::Buf,
    k: &D::Buf,
    v: &D::Buf,
    probs: &D::Buf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Checked> {
    let (n, pn) = sizes(batch, tokens, heads, head_dim)?;
    for (name, b) in [
        ("attention dq", dq),
        ("attention dk", dk),
        ("attention dv", dv),
        ("attention dout", dout),
        ("attention q", q),
        ("attention k", k),
        ("attention v", v),
    ] {
        need(dev, name, b, n)?;
    }
    need(dev, "attention probs", probs, pn)?;
    Ok(Checked::new())
}

/// Multi-head self-attention core for `batch` images of `tokens` tokens,
/// `heads` heads of width `head_dim`; `q, k, v, out: [batch, tokens,
/// heads*head_dim]` (head h occupies columns `h*head_dim..(h+1)*head_dim`).
/// Writes `probs[batch, heads, tokens, tokens] = softmax(q kᵀ / √head_dim)`
/// (row-wise) and `out = probs · v`.
#[allow(clippy::too_many_arguments)]
pub fn forward<D: AttentionKernel>(
    dev: &D,
    out: &mut D::Buf,
    probs: &mut D::Buf,
    q: &D::Buf,
    k: &D::Buf,
    v: &D::Buf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    let ok = check_forward(dev, out, probs, q, k, v, batch, tokens, heads, head_dim)?;
    let w = dev.profiling().then(|| {
        let (n, pn) = (
            batch * tokens * heads * head_dim,
            batch * heads * tokens * tokens,
        );
        work(
            dev,
            &[(q, n), (k, n), (v, n), (out, n), (probs, pn)],
            4.0 * (pn * head_dim) as f64,
        )
    });
    profiled(dev, "attention_forward", w, || {
        dev.attention_forward(out, probs, q, k, v, batch, tokens, heads, head_dim, ok)
    })
}

/// Attention backward: WRITES `dq`, `dk`, `dv` from `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward<D: AttentionKernel>(
    dev: &D,
    dq: &mut D::Buf,
    dk: &mut D::Buf,
    dv: &mut D::Buf,
    dout: &D::Buf,
    q: &D::Buf,
    k: &D::Buf,
    v: &D::Buf,
    probs: &D::Buf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    let ok = check_backward(
        dev, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
    )?;
    // Four products of 2·T²·dh each per (image, head): dP, dV, dQ, dK.
    let w = dev.profiling().then(|| {
        let (n, pn) = (
            batch * tokens * heads * head_dim,
            batch * heads * tokens * tokens,
        );
        work(
            dev,
            &[
                (dout, n),
                (q, n),
                (k, n),
                (v, n),
                (probs, pn),
                (dq, n),
                (dk, n),
                (dv, n),
            ],
            8.0 * (pn * head_dim) as f64,
        )
    });
    profiled(dev, "attention_backward", w, || {
        dev.attention_backward(
            dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim, ok,
        )
    })
}

/// Elements of one `[batch, heads·head_dim]` class-token tensor (q, out,
/// dq, dout), of one `[batch, tokens, heads·head_dim]` tensor (k, v, dk,
/// dv) and of the probabilities `[batch, heads, tokens]`.
fn class_token_sizes(
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<(usize, usize, usize)> {
    Ok((
        product("class-token attention", &[batch, heads, head_dim])?,
        product("class-token attention", &[batch, tokens, heads, head_dim])?,
        product("class-token attention probs", &[batch, heads, tokens])?,
    ))
}

/// Attention of the class token's query alone, for `batch` images of
/// `tokens` tokens (module doc): `q, out: [batch, heads·head_dim]` (one row
/// per image), `k, v: [batch, tokens, heads·head_dim]`. Writes
/// `probs[batch, heads, tokens] = softmax(q kᵀ / √head_dim)` and
/// `out = probs · v`: the class-token rows of `forward`.
#[allow(clippy::too_many_arguments)]
pub fn class_token_forward<D: AttentionKernel>(
    dev: &D,
    out: &mut D::Buf,
    probs: &mut D::Buf,
    q: &D::Buf,
    k: &D::Buf,
    v: &D::Buf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    let (rows, all, pn) = class_token_sizes(batch, tokens, heads, head_dim)?;
    for (name, b, n) in [
        ("class-token attention q", q, rows),
        ("class-token attention out", &*out, rows),
        ("class-token attention k", k, all),
        ("class-token attention v", v, all),
        ("class-token attention probs", &*probs, pn),
    ] {
        need(dev, name, b, n)?;
    }
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[(q, rows), (k, all), (v, all), (out, rows), (probs, pn)],
            4.0 * (pn * head_dim) as f64,
        )
    });
    profiled(dev, "attention_cls_forward", w, || {
        dev.class_token_attention_forward(
            out,
            probs,
            q,
            k,
            v,
            batch,
            tokens,
            heads,
            head_dim,
            Checked::new(),
        )
    })
}

/// Backward of `class_token_forward`: WRITES `dq` (`[batch, heads·head_dim]`)
/// and every row of `dk`, `dv` from `dout` (`[batch, heads·head_dim]`): the
/// gradients of `backward` when only the class token's row of `dout` is
/// non-zero.
#[allow(clippy::too_many_arguments)]
pub fn class_token_backward<D: AttentionKernel>(
    dev: &D,
    dq: &mut D::Buf,
    dk: &mut D::Buf,
    dv: &mut D::Buf,
    dout: &D::Buf,
    q: &D::Buf,
    k: &D::Buf,
    v: &D::Buf,
    probs: &D::Buf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    let (rows, all, pn) = class_token_sizes(batch, tokens, heads, head_dim)?;
    for (name, b, n) in [
        ("class-token attention dq", &*dq, rows),
        ("class-token attention dk", &*dk, all),
        ("class-token attention dv", &*dv, all),
        ("class-token attention dout", dout, rows),
        ("class-token attention q", q, rows),
        ("class-token attention k", k, all),
        ("class-token attention v", v, all),
        ("class-token attention probs", probs, pn),
    ] {
        need(dev, name, b, n)?;
    }
    // dP, dq, dk, dv: 2·T·dh each per (image, head).
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (dout, rows),
                (q, rows),
                (k, all),
                (v, all),
                (probs, pn),
                (dq, rows),
                (dk, all),
                (dv, all),
            ],
            8.0 * (pn * head_dim) as f64,
        )
    });
    profiled(dev, "attention_cls_backward", w, || {
        dev.class_token_attention_backward(
            dq,
            dk,
            dv,
            dout,
            q,
            k,
            v,
            probs,
            batch,
            tokens,
            heads,
            head_dim,
            Checked::new(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::device::{Cpu, Precision};
    use crate::ops::Backend;
    use crate::testing::{
        act, assert_close, dot, each_buffer_short, fd_check, randn, random, tol, RED,
    };

    const B: usize = 2;
    const T: usize = 5;
    const H: usize = 2;
    const DH: usize = 4;
    const N: usize = B * T * H * DH;

    fn forward(q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut o, mut p) = (vec![0.0; N], vec![0.0; B * H * T * T]);
        attention_forward(&mut o, &mut p, q, k, v, B, T, H, DH);
        (o, p)
    }

    /// Plain loops in f64, for the forward values.
    fn naive(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let d = H * DH;
        let mut o = vec![0f64; N];
        for b in 0..B {
            for h in 0..H {
                for i in 0..T {
                    let at = |x: &[f32], t: usize, c: usize| x[(b * T + t) * d + h * DH + c] as f64;
                    let s: Vec<f64> = (0..T)
                        .map(|j| {
                            (0..DH).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>()
                                / (DH as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..DH {
                        o[(b * T + i) * d + h * DH + c] =
                            (0..T).map(|j| e[j] / z * at(v, j, c)).sum();
                    }
                }
            }
        }
        o
    }

    #[test]
    fn forward_matches_plain_loops() {
        let (q, k, v) = (random(N, 1), random(N, 2), random(N, 3));
        let (o, _) = forward(&q, &k, &v);
        for (a, b) in o.iter().zip(naive(&q, &k, &v)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// Scores far below their row's maximum give probabilities that are
    /// exactly 0, never subnormal numbers (each would cost a microcode
    /// assist), rows that still sum to 1, and gradients without subnormals.
    /// Two tied maxima make Σ = 2, so the clamped e^−87 / Σ of the far
    /// scores would be subnormal without the flush.
    #[test]
    fn far_apart_scores_make_no_subnormals() {
        let d = H * DH;
        // Per image and head, q = (4, 0, ..) and the keys' first coordinates
        // give the scores 4·a/√DH = 20, 20, −200, −400, 10.
        let first = [10.0f32, 10.0, -100.0, -200.0, 5.0];
        let (mut q, mut k) = (vec![0.0; N], vec![0.0; N]);
        for b in 0..B {
            for t in 0..T {
                for h in 0..H {
                    q[(b * T + t) * d + h * DH] = 4.0;
                    k[(b * T + t) * d + h * DH] = first[t];
                }
            }
        }
        let v = random(N, 23);
        let (_, p) = forward(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; N], vec![0.0; N], vec![0.0; N]);
        attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &random(N, 24),
            &q,
            &k,
            &v,
            &p,
            B,
            T,
            H,
            DH,
        );
        assert!(
            p.iter().all(|x| !x.is_subnormal()),
            "a subnormal probability: {p:?}"
        );
        assert!(
            dq.iter().chain(&dk).chain(&dv).all(|x| !x.is_subnormal()),
            "a subnormal gradient"
        );
        for row in p.chunks(T) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert_eq!((row[2], row[3]), (0.0, 0.0), "{row:?}");
        }
        let (_, p_cls) = class_token(&class_rows(&q), &k, &v);
        assert!(
            p_cls.iter().all(|x| !x.is_subnormal()),
            "a subnormal class-token probability: {p_cls:?}"
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (q, k, v, w) = (random(N, 1), random(N, 2), random(N, 3), random(N, 4));
        let (_, p) = forward(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; N], vec![0.0; N], vec![0.0; N]);
        attention_backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &p, B, T, H, DH);
        fd_check("attention dq", &q, &dq, 40, |q| {
            dot(&w, &forward(q, &k, &v).0)
        });
        fd_check("attention dk", &k, &dk, 40, |k| {
            dot(&w, &forward(&q, k, &v).0)
        });
        fd_check("attention dv", &v, &dv, 40, |v| {
            dot(&w, &forward(&q, &k, v).0)
        });
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let pn = B * H * T * T;
        let lens = [N, pn, N, N, N];
        each_buffer_short("forward", &lens, 0.5, |b| {
            let [out, probs, q, k, v] = b else {
                unreachable!()
            };
            super::forward(&Cpu, out, probs, q, k, v, B, T, H, DH)
        });
        let lens = [N, N, N, N, N, N, N, pn];
        each_buffer_short("backward", &lens, 0.5, |b| {
            let [dq, dk, dv, dout, q, k, v, probs] = b else {
                unreachable!()
            };
            super::backward(&Cpu, dq, dk, dv, dout, q, k, v, probs, B, T, H, DH)
        });
    }

    fn check_on<D: Backend>(
        dev: &D,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        tolerance: f32,
    ) {
        let n = batch * tokens * heads * head_dim;
        let pn = batch * heads * tokens * tokens;
        let inputs = vec![
            act(randn(26, n, 1.0)),
            act(randn(27, n, 1.0)),
            act(randn(28, n, 1.0)),
            act(vec![0.0; n]),
            act(vec![0.0; pn]),
            act(randn(29, n, 1.0)),
            act(randn(30, n, 1.0)),
            act(randn(31, n, 1.0)),
            act(randn(32, n, 1.0)),
        ];
        let (c, g) = crate::on_both!(
            dev,
            inputs,
            |be, [q, k, v, out, probs, dout, dq, dk, dv]| {
                super::forward(be, out, probs, q, k, v, batch, tokens, heads, head_dim).unwrap();
                super::backward(
                    be, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
                )
                .unwrap();
            }
        );
        assert_close(
            &format!(
                "attention {:?} b{batch} t{tokens} h{heads} dh{head_dim}",
                dev.precision()
            ),
            &g,
            &c,
            tolerance,
        );
    }

    fn fused_vit_shapes_match_the_cpu<D: Backend>(dev: &D) {
        let t = tol(dev.precision(), RED);
        check_on(dev, 2, 197, 3, 64, t);
        check_on(dev, 3, 17, 2, 8, t);
        check_on(dev, 1, 65, 1, 128, t);
    }

    /// The unfused path stores the scores S = q kᵀ/√dh in the activation
    /// type between the GEMM and the softmax: in bf16 a score near 4 is off by
    /// up to 2^-7, which moves its probability by up to 1.6%, so the bf16
    /// tolerance here is 2e-2 (the fused kernels keep S in fp32).
    fn long_sequences_match_the_cpu<D: Backend>(dev: &D) {
        let t = if dev.precision() == Precision::Bf16 {
            2e-2
        } else {
            RED
        };
        check_on(dev, 2, 300, 2, 64, t);
        check_on(dev, 1, 256, 2, 128, t);
    }

    /// Sequences of at most 64 tokens, head widths multiples of 16: the
    /// short kernels on a device with `EFFRANK_CUDA_SHORT_ATTENTION` on
    /// (`cuda_*_new_paths`), the fused kernels otherwise. ViT-B/32's 50
    /// tokens; one token; 17 and 33 tokens (padding inside a 16-row tile);
    /// exactly 64; head widths 16 to 128.
    fn short_sequences_match_the_cpu<D: Backend>(dev: &D) {
        let t = tol(dev.precision(), RED);
        check_on(dev, 4, 50, 3, 64, t);
        check_on(dev, 3, 17, 2, 16, t);
        check_on(dev, 2, 33, 2, 48, t);
        check_on(dev, 1, 64, 2, 128, t);
        check_on(dev, 5, 1, 1, 32, t);
    }

    /// The class token's row of each image, `[B, H·DH]`, of a `[B, T, H·DH]` tensor.
    fn class_rows(x: &[f32]) -> Vec<f32> {
        let d = H * DH;
        (0..B)
            .flat_map(|b| x[b * T * d..b * T * d + d].to_vec())
            .collect()
    }

    fn class_token(q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut o, mut p) = (vec![0.0; B * H * DH], vec![0.0; B * H * T]);
        class_token_attention_forward(&mut o, &mut p, q, k, v, B, T, H, DH);
        (o, p)
    }

    /// The class-token op gives `forward`'s class-token rows (output and
    /// probabilities) and, with `dout` zero on every other row, `backward`'s
    /// gradients: dq's class-token rows, every row of dk and dv.
    #[test]
    fn class_token_attention_is_the_class_token_rows_of_attention() {
        let (q, k, v) = (random(N, 5), random(N, 6), random(N, 7));
        let (o, p) = forward(&q, &k, &v);
        let (o_cls, p_cls) = class_token(&class_rows(&q), &k, &v);
        let close = |name: &str, got: &[f32], want: &[f32]| {
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{name}[{i}]: {a} vs {b}"
                );
            }
        };
        close("out", &o_cls, &class_rows(&o));
        let p_rows: Vec<f32> = (0..B * H)
            .flat_map(|bh| p[bh * T * T..bh * T * T + T].to_vec())
            .collect();
        close("probs", &p_cls, &p_rows);

        let d = H * DH;
        let dout_cls = random(B * d, 8);
        let mut dout = vec![0.0; N];
        for b in 0..B {
            dout[b * T * d..b * T * d + d].copy_from_slice(&dout_cls[b * d..(b + 1) * d]);
        }
        let (mut dq, mut dk, mut dv) = (vec![0.0; N], vec![0.0; N], vec![0.0; N]);
        attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &p, B, T, H, DH,
        );
        let (mut dq_cls, mut dk_cls, mut dv_cls) =
            (vec![f32::NAN; B * d], vec![f32::NAN; N], vec![f32::NAN; N]);
        class_token_attention_backward(
            &mut dq_cls,
            &mut dk_cls,
            &mut dv_cls,
            &dout_cls,
            &class_rows(&q),
            &k,
            &v,
            &p_cls,
            B,
            T,
            H,
            DH,
        );
        close("dq", &dq_cls, &class_rows(&dq));
        close("dk", &dk_cls, &dk);
        close("dv", &dv_cls, &dv);
    }

    #[test]
    fn class_token_backward_matches_finite_differences() {
        let (q, k, v, w) = (
            random(B * H * DH, 11),
            random(N, 12),
            random(N, 13),
            random(B * H * DH, 14),
        );
        let (_, p) = class_token(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; B * H * DH], vec![0.0; N], vec![0.0; N]);
        class_token_attention_backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &p, B, T, H, DH);
        fd_check("class-token attention dq", &q, &dq, 16, |q| {
            dot(&w, &class_token(q, &k, &v).0)
        });
        fd_check("class-token attention dk", &k, &dk, 40, |k| {
            dot(&w, &class_token(&q, k, &v).0)
        });
        fd_check("class-token attention dv", &v, &dv, 40, |v| {
            dot(&w, &class_token(&q, &k, v).0)
        });
    }

    #[test]
    fn class_token_wrong_shapes_are_errors() {
        let (rows, pn) = (B * H * DH, B * H * T);
        let lens = [rows, pn, rows, N, N];
        each_buffer_short("class-token forward", &lens, 0.5, |b| {
            let [out, probs, q, k, v] = b else {
                unreachable!()
            };
            super::class_token_forward(&Cpu, out, probs, q, k, v, B, T, H, DH)
        });
        let lens = [rows, N, N, rows, rows, N, N, pn];
        each_buffer_short("class-token backward", &lens, 0.5, |b| {
            let [dq, dk, dv, dout, q, k, v, probs] = b else {
                unreachable!()
            };
            super::class_token_backward(&Cpu, dq, dk, dv, dout, q, k, v, probs, B, T, H, DH)
        });
    }

    /// The device's class-token kernels against the CPU's, forward and
    /// backward: vit-cifar's last block (65 tokens, 3 heads of 64), ViT-B's
    /// (50 tokens, 12 of 64), an odd shape, and one token.
    fn class_token_attention_matches_the_cpu<D: Backend>(dev: &D) {
        for (batch, tokens, heads, head_dim) in [
            (4, 65, 3, 64),
            (2, 50, 12, 64),
            (3, 17, 2, 8),
            (2, 1, 1, 32),
        ] {
            let (rows, all, pn) = (
                batch * heads * head_dim,
                batch * tokens * heads * head_dim,
                batch * heads * tokens,
            );
            let inputs = vec![
                act(randn(40, rows, 1.0)),
                act(randn(41, all, 1.0)),
                act(randn(42, all, 1.0)),
                act(vec![0.0; rows]),
                act(vec![0.0; pn]),
                act(randn(43, rows, 1.0)),
                act(vec![0.0; rows]),
                act(vec![0.0; all]),
                act(vec![0.0; all]),
            ];
            let (c, g) = crate::on_both!(
                dev,
                inputs,
                |be, [q, k, v, out, probs, dout, dq, dk, dv]| {
                    super::class_token_forward(
                        be, out, probs, q, k, v, batch, tokens, heads, head_dim,
                    )
                    .unwrap();
                    super::class_token_backward(
                        be, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
                    )
                    .unwrap();
                }
            );
            assert_close(
                &format!(
                    "class-token attention {:?} b{batch} t{tokens} h{heads} dh{head_dim}",
                    dev.precision()
                ),
                &g,
                &c,
                tol(dev.precision(), RED),
            );
        }
    }

    crate::on_every_device!(class_token_attention_matches_the_cpu);
    crate::on_every_device!(fused_vit_shapes_match_the_cpu);
    crate::on_every_device!(short_sequences_match_the_cpu);
    crate::on_every_device!(long_sequences_match_the_cpu);
}
