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
//!
//! Every entry point takes the sizes as one `AttentionShape` (images,
//! tokens, heads, head width) and the three inputs `q, k, v` (and the three
//! gradients `dq, dk, dv`) as one `Qkv`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// The sizes of one attention call: `batch` images of `tokens` tokens,
/// `heads` heads of width `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Columns of a `[batch, tokens, heads·head_dim]` tensor: `heads·head_dim`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Rows of a `[batch, tokens, ·]` tensor: `batch·tokens`.
    pub fn rows(&self) -> usize {
        self.batch * self.tokens
    }
    /// (image, head) pairs: `batch·heads`.
    pub fn pairs(&self) -> usize {
        self.batch * self.heads
    }
    /// Elements of one `[batch, tokens, heads·head_dim]` tensor (q, k, v, out
    /// and their gradients).
    pub fn len(&self) -> usize {
        self.batch * self.tokens * self.heads * self.head_dim
    }
    /// Whether a tensor of this shape has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements of the probabilities `[batch, heads, tokens, tokens]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.tokens * self.tokens
    }
    /// Elements of one class-token tensor `[batch, heads·head_dim]` (q, out,
    /// dq, dout of the class-token ops).
    pub fn class_token_len(&self) -> usize {
        self.batch * self.heads * self.head_dim
    }
    /// Elements of the class-token probabilities `[batch, heads, tokens]`.
    pub fn class_token_probs_len(&self) -> usize {
        self.batch * self.heads * self.tokens
    }
    /// The softmax scale `1/√head_dim`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// The three operands that travel together: `q, k, v` (`Qkv<&Buf>`) or
/// their gradients `dq, dk, dv` (`Qkv<&mut Buf>`).
#[derive(Clone, Copy, Debug)]
pub struct Qkv<T> {
    pub q: T,
    pub k: T,
    pub v: T,
}

impl<T: ?Sized> Qkv<&mut T> {
    /// The same three, read-only.
    pub fn shared(&self) -> Qkv<&T> {
        Qkv {
            q: &*self.q,
            k: &*self.k,
            v: &*self.v,
        }
    }
}

/// Device bodies of attention (call `forward` / `backward`).
pub trait AttentionKernel: Device {
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        x: Qkv<&Self::Buf>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()>;
    fn attention_backward(
        &self,
        grads: Qkv<&mut Self::Buf>,
        dout: &Self::Buf,
        x: Qkv<&Self::Buf>,
        probs: &Self::Buf,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()>;
    fn class_token_attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        x: Qkv<&Self::Buf>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()>;
    fn class_token_attention_backward(
        &self,
        grads: Qkv<&mut Self::Buf>,
        dout: &Self::Buf,
        x: Qkv<&Self::Buf>,
        probs: &Self::Buf,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()>;
}

/// Elements of one `[batch, tokens, heads·head_dim]` tensor and of the
/// probabilities `[batch, heads, tokens, tokens]`, checked for overflow.
fn sizes(s: AttentionShape) -> Result<(usize, usize)> {
    Ok((
        product("attention", &[s.batch, s.tokens, s.heads, s.head_dim])?,
        product("attention probs", &[s.batch, s.heads, s.tokens, s.tokens])?,
    ))
}

/// The checks of `forward`, for callers that pick a device's path
/// themselves (the CUDA benches): the token they need to call it.
pub fn check_forward<D: Device>(
    dev: &D,
    out: &D::Buf,
    probs: &D::Buf,
    x: Qkv<&D::Buf>,
    shape: AttentionShape,
) -> Result<Checked> {
    let (n, pn) = sizes(shape)?;
    for (name, b) in [
        ("attention q", x.q),
        ("attention k", x.k),
        ("attention v", x.v),
        ("attention out", out),
    ] {
        need(dev, name, b, n)?;
    }
    need(dev, "attention probs", probs, pn)?;
    Ok(Checked::new())
}

/// The checks of `backward` (see `check_forward`).
pub fn check_backward<D: Device>(
    dev: &D,
    grads: Qkv<&D::Buf>,
    dout: &D::Buf,
    x: Qkv<&D::Buf>,
    probs: &D::Buf,
    shape: AttentionShape,
) -> Result<Checked> {
    let (n, pn) = sizes(shape)?;
    for (name, b) in [
        ("attention dq", grads.q),
        ("attention dk", grads.k),
        ("attention dv", grads.v),
        ("attention dout", dout),
        ("attention q", x.q),
        ("attention k", x.k),
        ("attention v", x.v),
    ] {
        need(dev, name, b, n)?;
    }
    need(dev, "attention probs", probs, pn)?;
    Ok(Checked::new())
}

/// Multi-head self-attention core for `shape.batch` images of
/// `shape.tokens` tokens, `shape.heads` heads of width `shape.head_dim`;
/// `q, k, v, out: [batch, tokens, heads*head_dim]` (head h occupies columns
/// `h*head_dim..(h+1)*head_dim`). Writes `probs[batch, heads, tokens,
/// tokens] = softmax(q kᵀ / √head_dim)` (row-wise) and `out = probs · v`.
pub fn forward<D: AttentionKernel>(
    dev: &D,
    out: &mut D::Buf,
    probs: &mut D::Buf,
    x: Qkv<&D::Buf>,
    shape: AttentionShape,
) -> Result<()> {
    let ok = check_forward(dev, out, probs, x, shape)?;
    let w = dev.profiling().then(|| {
        let (n, pn) = (shape.len(), shape.probs_len());
        work(
            dev,
            &[(x.q, n), (x.k, n), (x.v, n), (out, n), (probs, pn)],
            4.0 * (pn * shape.head_dim) as f64,
        )
    });
    profiled(dev, "attention_forward", w, || {
        dev.attention_forward(out, probs, x, shape, ok)
    })
}

/// Attention backward: WRITES `grads` (`dq`, `dk`, `dv`) from `dout`.
pub fn backward<D: AttentionKernel>(
    dev: &D,
    grads: Qkv<&mut D::Buf>,
    dout: &D::Buf,
    x: Qkv<&D::Buf>,
    probs: &D::Buf,
    shape: AttentionShape,
) -> Result<()> {
    let ok = check_backward(dev, grads.shared(), dout, x, probs, shape)?;
    // Four products of 2·T²·dh each per (image, head): dP, dV, dQ, dK.
    let w = dev.profiling().then(|| {
        let (n, pn) = (shape.len(), shape.probs_len());
        work(
            dev,
            &[
                (dout, n),
                (x.q, n),
                (x.k, n),
                (x.v, n),
                (probs, pn),
                (&*grads.q, n),
                (&*grads.k, n),
                (&*grads.v, n),
            ],
            8.0 * (pn * shape.head_dim) as f64,
        )
    });
    profiled(dev, "attention_backward", w, || {
        dev.attention_backward(grads, dout, x, probs, shape, ok)
    })
}

/// Elements of one `[batch, heads·head_dim]` class-token tensor (q, out,
/// dq, dout), of one `[batch, tokens, heads·head_dim]` tensor (k, v, dk,
/// dv) and of the probabilities `[batch, heads, tokens]`, checked for
/// overflow.
fn class_token_sizes(s: AttentionShape) -> Result<(usize, usize, usize)> {
    Ok((
        product("class-token attention", &[s.batch, s.heads, s.head_dim])?,
        product(
            "class-token attention",
            &[s.batch, s.tokens, s.heads, s.head_dim],
        )?,
        product("class-token attention probs", &[s.batch, s.heads, s.tokens])?,
    ))
}

/// Attention of the class token's query alone, for `shape.batch` images of
/// `shape.tokens` tokens (module doc): `q, out: [batch, heads·head_dim]`
/// (one row per image), `k, v: [batch, tokens, heads·head_dim]`. Writes
/// `probs[batch, heads, tokens] = softmax(q kᵀ / √head_dim)` and
/// `out = probs · v`: the class-token rows of `forward`.
pub fn class_token_forward<D: AttentionKernel>(
    dev: &D,
    out: &mut D::Buf,
    probs: &mut D::Buf,
    x: Qkv<&D::Buf>,
    shape: AttentionShape,
) -> Result<()> {
    let (rows, all, pn) = class_token_sizes(shape)?;
    for (name, b, n) in [
        ("class-token attention q", x.q, rows),
        ("class-token attention out", &*out, rows),
        ("class-token attention k", x.k, all),
        ("class-token attention v", x.v, all),
        ("class-token attention probs", &*probs, pn),
    ] {
        need(dev, name, b, n)?;
    }
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (x.q, rows),
                (x.k, all),
                (x.v, all),
                (out, rows),
                (probs, pn),
            ],
            4.0 * (pn * shape.head_dim) as f64,
        )
    });
    profiled(dev, "attention_cls_forward", w, || {
        dev.class_token_attention_forward(out, probs, x, shape, Checked::new())
    })
}

/// Backward of `class_token_forward`: WRITES `dq` (`[batch, heads·head_dim]`)
/// and every row of `dk`, `dv` from `dout` (`[batch, heads·head_dim]`): the
/// gradients of `backward` when only the class token's row of `dout` is
/// non-zero.
pub fn class_token_backward<D: AttentionKernel>(
    dev: &D,
    grads: Qkv<&mut D::Buf>,
    dout: &D::Buf,
    x: Qkv<&D::Buf>,
    probs: &D::Buf,
    shape: AttentionShape,
) -> Result<()> {
    let (rows, all, pn) = class_token_sizes(shape)?;
    for (name, b, n) in [
        ("class-token attention dq", &*grads.q, rows),
        ("class-token attention dk", &*grads.k, all),
        ("class-token attention dv", &*grads.v, all),
        ("class-token attention dout", dout, rows),
        ("class-token attention q", x.q, rows),
        ("class-token attention k", x.k, all),
        ("class-token attention v", x.v, all),
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
                (x.q, rows),
                (x.k, all),
                (x.v, all),
                (probs, pn),
                (&*grads.q, rows),
                (&*grads.k, all),
                (&*grads.v, all),
            ],
            8.0 * (pn * shape.head_dim) as f64,
        )
    });
    profiled(dev, "attention_cls_backward", w, || {
        dev.class_token_attention_backward(grads, dout, x, probs, shape, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{AttentionShape, Qkv};
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
    const SHAPE: AttentionShape = AttentionShape {
        batch: B,
        tokens: T,
        heads: H,
        head_dim: DH,
    };

    /// `q, k, v` as one `Qkv`.
    fn qkv<'a, X: ?Sized>(q: &'a X, k: &'a X, v: &'a X) -> Qkv<&'a X> {
        Qkv { q, k, v }
    }

    /// `dq, dk, dv` as one `Qkv`.
    fn grads<'a, X: ?Sized>(q: &'a mut X, k: &'a mut X, v: &'a mut X) -> Qkv<&'a mut X> {
        Qkv { q, k, v }
    }

    fn forward(q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut o, mut p) = (vec![0.0; N], vec![0.0; B * H * T * T]);
        attention_forward(&mut o, &mut p, qkv(q, k, v), SHAPE);
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
            grads(&mut dq, &mut dk, &mut dv),
            &random(N, 24),
            qkv(&q, &k, &v),
            &p,
            SHAPE,
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
        attention_backward(
            grads(&mut dq, &mut dk, &mut dv),
            &w,
            qkv(&q, &k, &v),
            &p,
            SHAPE,
        );
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
            super::forward(&Cpu, out, probs, qkv(q, k, v), SHAPE)
        });
        let lens = [N, N, N, N, N, N, N, pn];
        each_buffer_short("backward", &lens, 0.5, |b| {
            let [dq, dk, dv, dout, q, k, v, probs] = b else {
                unreachable!()
            };
            super::backward(&Cpu, grads(dq, dk, dv), dout, qkv(q, k, v), probs, SHAPE)
        });
    }

    fn check_on<D: Backend>(dev: &D, (batch, tokens, heads, head_dim): Dims, tolerance: f32) {
        let shape = AttentionShape {
            batch,
            tokens,
            heads,
            head_dim,
        };
        let (n, pn) = (shape.len(), shape.probs_len());
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
                super::forward(be, out, probs, qkv(q, k, v), shape).unwrap();
                super::backward(be, grads(dq, dk, dv), dout, qkv(q, k, v), probs, shape).unwrap();
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

    /// `(batch, tokens, heads, head_dim)`.
    type Dims = (usize, usize, usize, usize);

    fn fused_vit_shapes_match_the_cpu<D: Backend>(dev: &D) {
        let t = tol(dev.precision(), RED);
        check_on(dev, (2, 197, 3, 64), t);
        check_on(dev, (3, 17, 2, 8), t);
        check_on(dev, (1, 65, 1, 128), t);
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
        check_on(dev, (2, 300, 2, 64), t);
        check_on(dev, (1, 256, 2, 128), t);
    }

    /// Sequences of at most 64 tokens, head widths multiples of 16: the
    /// short kernels on a device with `--short-attention on`
    /// (`cuda_*_new_paths`), the fused kernels otherwise. ViT-B/32's 50
    /// tokens; one token; 17 and 33 tokens (padding inside a 16-row tile);
    /// exactly 64; head widths 16 to 128.
    fn short_sequences_match_the_cpu<D: Backend>(dev: &D) {
        let t = tol(dev.precision(), RED);
        check_on(dev, (4, 50, 3, 64), t);
        check_on(dev, (3, 17, 2, 16), t);
        check_on(dev, (2, 33, 2, 48), t);
        check_on(dev, (1, 64, 2, 128), t);
        check_on(dev, (5, 1, 1, 32), t);
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
        class_token_attention_forward(&mut o, &mut p, qkv(q, k, v), SHAPE);
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
            grads(&mut dq, &mut dk, &mut dv),
            &dout,
            qkv(&q, &k, &v),
            &p,
            SHAPE,
        );
        let (mut dq_cls, mut dk_cls, mut dv_cls) =
            (vec![f32::NAN; B * d], vec![f32::NAN; N], vec![f32::NAN; N]);
        class_token_attention_backward(
            grads(&mut dq_cls, &mut dk_cls, &mut dv_cls),
            &dout_cls,
            qkv(&class_rows(&q), &k, &v),
            &p_cls,
            SHAPE,
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
        class_token_attention_backward(
            grads(&mut dq, &mut dk, &mut dv),
            &w,
            qkv(&q, &k, &v),
            &p,
            SHAPE,
        );
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
            super::class_token_forward(&Cpu, out, probs, qkv(q, k, v), SHAPE)
        });
        let lens = [rows, N, N, rows, rows, N, N, pn];
        each_buffer_short("class-token backward", &lens, 0.5, |b| {
            let [dq, dk, dv, dout, q, k, v, probs] = b else {
                unreachable!()
            };
            super::class_token_backward(&Cpu, grads(dq, dk, dv), dout, qkv(q, k, v), probs, SHAPE)
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
            let shape = AttentionShape {
                batch,
                tokens,
                heads,
                head_dim,
            };
            let (rows, all, pn) = (
                shape.class_token_len(),
                shape.len(),
                shape.class_token_probs_len(),
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
                    super::class_token_forward(be, out, probs, qkv(q, k, v), shape).unwrap();
                    super::class_token_backward(
                        be,
                        grads(dq, dk, dv),
                        dout,
                        qkv(q, k, v),
                        probs,
                        shape,
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
