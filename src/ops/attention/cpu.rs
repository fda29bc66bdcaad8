//! Multi-head attention on the CPU: one rayon task per (image, head), each
//! running single-threaded strided products (faer) directly on its head's
//! columns of q, k, v and out (no copies), so every task writes only its own
//! head's columns. The backward pass at 16-wide heads computes its one
//! product over the head width on register tiles instead (the second half
//! of this file). The entry points take the sizes as one `AttentionShape`
//! and `q, k, v` (and `dq, dk, dv`) as one `Qkv` of slices.

use super::{AttentionKernel, AttentionShape, Qkv};
use crate::device::Cpu;
use crate::ops::gelu::cpu::exp;
use crate::ops::matmul::cpu::SharedMut;
use crate::ops::simd::{fold_pairwise, level, vectorized, Level};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

/// A strided matrix operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    rs: usize,
    cs: usize,
}

/// The operand at `ptr` with row stride `rs` and column stride `cs`.
fn strided<P>(ptr: P, rs: usize, cs: usize) -> Strided<P> {
    Strided { ptr, rs, cs }
}

/// `c[m, n] = alpha · a[m, k] · b[k, n]` with explicit strides, one thread.
unsafe fn gemm(
    (m, k, n): (usize, usize, usize),
    alpha: f32,
    a: Strided<*const f32>,
    b: Strided<*const f32>,
    c: Strided<*mut f32>,
) {
    use faer::{MatMut, MatRef};
    crate::ops::matmul::cpu::gemm(
        alpha,
        MatRef::from_raw_parts(a.ptr, m, k, a.rs as isize, a.cs as isize),
        MatRef::from_raw_parts(b.ptr, k, n, b.rs as isize, b.cs as isize),
        crate::ops::matmul::Accumulate::Overwrite,
        MatMut::from_raw_parts_mut(c.ptr, m, n, c.rs as isize, c.cs as isize),
        1,
    );
}

pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    x: Qkv<&[f32]>,
    shape: AttentionShape,
) {
    let n = shape.len();
    assert!(
        x.q.len() >= n
            && x.k.len() >= n
            && x.v.len() >= n
            && out.len() >= n
            && probs.len() >= shape.probs_len()
    );
    products_forward(out, probs, x, shape)
}

/// The forward pass as faer products per (image, head): the path for head
/// widths the tiles do not cover, and the baseline of `cargo bench --bench
/// cpu_ops`.
pub fn products_forward(out: &mut [f32], probs: &mut [f32], x: Qkv<&[f32]>, shape: AttentionShape) {
    let Qkv { q, k, v } = x;
    let (t, dh, d, heads) = (shape.tokens, shape.head_dim, shape.width(), shape.heads);
    let scale = shape.scale();
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs[..shape.probs_len()]
        .par_chunks_mut(t * t)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / heads, bh % heads);
            let base = b * t * d + h * dh;
            let o = out_ptr;
            // SAFETY: offsets stay inside [batch, tokens, d]; task (b, h) writes
            // only rows of image b and columns h*dh..(h+1)*dh of `out`.
            unsafe {
                gemm(
                    (t, dh, t),
                    scale,
                    strided(q.as_ptr().add(base), d, 1),
                    strided(k.as_ptr().add(base), 1, d),
                    strided(p.as_mut_ptr(), t, 1),
                );
            }
            vectorized(
                #[inline(always)]
                || {
                    for row in p.chunks_mut(t) {
                        softmax_in_place(row);
                    }
                },
            );
            unsafe {
                gemm(
                    (t, t, dh),
                    1.0,
                    strided(p.as_ptr(), t, 1),
                    strided(v.as_ptr().add(base), d, 1),
                    strided(o.0.add(base), d, 1),
                );
            }
        });
}

/// Independent lanes of the row maximum, sum and dot product in
/// `softmax_in_place` and the backward's dS: one AVX-512 register. A single
/// running max or sum is a chain of dependent instructions the compiler
/// must keep in order (floats do not reassociate). `cargo bench --bench
/// cpu_ops`, forward at 8 images × 12 heads × 50 tokens: 2.79-3.05 →
/// 1.92-2.22 ns per score (softmax was half of it).
const LANES: usize = 16;

#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// Scores more than this below their row's maximum get probability exactly
/// 0 (e^−80 < 2e-35): further down, e^x / Σ would be subnormal, and every
/// operation making or reading one costs the CPU a microcode assist (as
/// GELU's far tail did, `gelu::cpu::CDF_IS_ZERO_BEYOND`).
const FLUSHED_BELOW_MAX: f32 = -80.0;

/// e^x, or exactly 0 below `FLUSHED_BELOW_MAX`.
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    let e = exp(x);
    if x < FLUSHED_BELOW_MAX {
        0.0
    } else {
        e
    }
}

/// Row softmax with the branch-free `exp` of the GELU op (1-2 ulp), which
/// vectorizes (libm's `expf` is one call per score); max and sum run in 16
/// lanes, folded pairwise (`simd::fold_pairwise`), then the tail's elements
/// in order. Scores 80 or more below the maximum get 0 (`FLUSHED_BELOW_MAX`).
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let (chunks, tail) = row.as_chunks::<LANES>();
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for l in 0..LANES {
            lane_max[l] = larger(lane_max[l], c[l]);
        }
    }
    let max = tail
        .iter()
        .fold(fold_pairwise(lane_max, larger), |m, &v| larger(m, v));
    let (chunks, tail) = row.as_chunks_mut::<LANES>();
    let mut lane_sum = [0f32; LANES];
    for c in chunks {
        for l in 0..LANES {
            c[l] = exp_or_zero(c[l] - max);
            lane_sum[l] += c[l];
        }
    }
    let mut sum = fold_pairwise(lane_sum, |a, b| a + b);
    for v in tail.iter_mut() {
        *v = exp_or_zero(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `Σ a[i]·b[i]` in 16 lanes folded pairwise, then the tail in order (`b`
/// at least as long as `a`).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let ((a, a_tail), (b, b_tail)) = (a.as_chunks::<LANES>(), b[..a.len()].as_chunks::<LANES>());
    let mut lanes = [0f32; LANES];
    for (a, b) in a.iter().zip(b) {
        for l in 0..LANES {
            lanes[l] = a[l].mul_add(b[l], lanes[l]);
        }
    }
    a_tail
        .iter()
        .zip(b_tail)
        .fold(fold_pairwise(lanes, |x, y| x + y), |s, (&a, &b)| {
            a.mul_add(b, s)
        })
}

pub fn attention_backward(
    grads: Qkv<&mut [f32]>,
    dout: &[f32],
    x: Qkv<&[f32]>,
    probs: &[f32],
    shape: AttentionShape,
) {
    let n = shape.len();
    assert!(
        grads.q.len() >= n
            && grads.k.len() >= n
            && grads.v.len() >= n
            && dout.len() >= n
            && x.q.len() >= n
            && x.k.len() >= n
            && x.v.len() >= n
            && probs.len() >= shape.probs_len()
    );
    if tiled(shape.head_dim) {
        tiled_backward(grads, dout, x, probs, shape)
    } else {
        products_backward(grads, dout, x, probs, shape)
    }
}

/// The backward pass as faer products per (image, head) (see
/// `products_forward`).
pub fn products_backward(
    grads: Qkv<&mut [f32]>,
    dout: &[f32],
    x: Qkv<&[f32]>,
    probs: &[f32],
    shape: AttentionShape,
) {
    let Qkv { q, k, v } = x;
    let (t, dh, d, heads) = (shape.tokens, shape.head_dim, shape.width(), shape.heads);
    let scale = shape.scale();
    let (pq, pk, pv) = (
        SharedMut(grads.q.as_mut_ptr()),
        SharedMut(grads.k.as_mut_ptr()),
        SharedMut(grads.v.as_mut_ptr()),
    );
    (0..shape.pairs()).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        let base = b * t * d + h * dh;
        let p = &probs[bh * t * t..(bh + 1) * t * t];
        let mut ds = vec![0f32; t * t];
        let (pq, pk, pv) = (pq, pk, pv);
        // SAFETY: as in the forward pass, task (b, h) touches only its head's
        // columns of image b.
        unsafe {
            // dP = dout · vᵀ
            gemm(
                (t, dh, t),
                1.0,
                strided(dout.as_ptr().add(base), d, 1),
                strided(v.as_ptr().add(base), 1, d),
                strided(ds.as_mut_ptr(), t, 1),
            );
            // dV = Pᵀ · dout
            gemm(
                (t, t, dh),
                1.0,
                strided(p.as_ptr(), 1, t),
                strided(dout.as_ptr().add(base), d, 1),
                strided(pv.0.add(base), d, 1),
            );
        }
        // dS = P ∘ (dP − rowsum(dP ∘ P))
        vectorized(
            #[inline(always)]
            || {
                for (ds_row, p_row) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot = dot(ds_row, p_row);
                    for (g, &pv) in ds_row.iter_mut().zip(p_row) {
                        *g = pv * (*g - dot);
                    }
                }
            },
        );
        unsafe {
            // dQ = scale · dS · k ;  dK = scale · dSᵀ · q
            gemm(
                (t, t, dh),
                scale,
                strided(ds.as_ptr(), t, 1),
                strided(k.as_ptr().add(base), d, 1),
                strided(pq.0.add(base), d, 1),
            );
            gemm(
                (t, t, dh),
                scale,
                strided(ds.as_ptr(), 1, t),
                strided(q.as_ptr().add(base), d, 1),
                strided(pk.0.add(base), d, 1),
            );
        }
    });
}

// ---------------------------------------------------------------------------
// The backward pass at 16-wide heads (AVX-512): dP = do vᵀ on register tiles.
//
// Of the six products of a head, dP = do vᵀ (and s = q kᵀ in the forward)
// are t × t outputs over an inner dimension of only dh. There, vᵀ is packed
// once per head as [dh][tp] (tp = tokens rounded up to 16) and a tile of 8
// query rows × 2 vectors of keys keeps 16 accumulators in registers: each
// step broadcasts one element of `do` per row and loads two contiguous
// vectors of vᵀ, with no horizontal sums; the inner index is summed in
// order, so results do not depend on the thread count. The other three
// products (inner dimension t) stay with faer.
//
// `cargo bench --bench cpu_ops` (2-core Xeon, this and faer's products in
// the same run): backward 1.27x at small32's heads (64 images × 4 heads ×
// 65 tokens × 16); at 32- and 64-wide heads 0.92-0.95x, so those keep the
// products. The same tiles for s = q kᵀ, and for all six products (P v with
// P read by broadcasts), made the forward 0.6-0.9x of faer's at every width,
// so the forward stays on the products. Written with intrinsics: lane
// arrays left to the compiler kept the accumulators on the stack.
// ---------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::{strided, AttentionShape, Qkv};
    use std::arch::x86_64::*;

    /// Rows at stride `ld` from `ptr` (each row contiguous).
    #[derive(Clone, Copy)]
    pub struct Rows<P> {
        pub ptr: P,
        pub ld: usize,
    }

    impl<P: Copy> Rows<P> {
        fn new(ptr: P, ld: usize) -> Self {
            Rows { ptr, ld }
        }
    }

    /// Rows per block of queries (and of keys in dk, dv).
    pub const RS: usize = 8;
    /// Lanes of a vector.
    pub const L: usize = 16;

    /// `out[r][c·16..] = alpha · Σ_dd a[r·lda + dd] · bt[dd·ldb + c·16..]`
    /// for R rows and C vectors (an A·Bᵀ tile with Bᵀ packed; `lda`, `ldb`,
    /// `ldo` the strides of `a`, `bt`, `out`).
    ///
    /// # Safety
    /// AVX-512F; all addressed elements lie inside their buffers.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile_abt<const R: usize, const C: usize>(
        a: Rows<*const f32>,
        bt: Rows<*const f32>,
        depth: usize,
        alpha: f32,
        out: Rows<*mut f32>,
    ) {
        let (Rows { ptr: a, ld: lda }, Rows { ptr: bt, ld: ldb }) = (a, bt);
        let Rows { ptr: out, ld: ldo } = out;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for dd in 0..depth {
            let mut b = [_mm512_setzero_ps(); C];
            for (c, bc) in b.iter_mut().enumerate() {
                *bc = _mm512_loadu_ps(bt.add(dd * ldb + c * L));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(r * lda + dd));
                for (acc_rc, bc) in acc_r.iter_mut().zip(&b) {
                    *acc_rc = _mm512_fmadd_ps(x, *bc, *acc_rc);
                }
            }
        }
        let alpha = _mm512_set1_ps(alpha);
        for (r, acc_r) in acc.iter().enumerate() {
            for (c, acc_rc) in acc_r.iter().enumerate() {
                _mm512_storeu_ps(out.add(r * ldo + c * L), _mm512_mul_ps(alpha, *acc_rc));
            }
        }
    }

    /// `rows` (≤ RS) rows of `alpha · a · btᵀ` into `out` (its stride
    /// `out.ld`, `tp` columns), two vectors at a time; `bt` is `depth` rows of
    /// `tp = bt.ld` columns.
    ///
    /// # Safety
    /// As `tile_abt`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn rows_abt(
        rows: usize,
        a: Rows<*const f32>,
        bt: Rows<*const f32>,
        depth: usize,
        alpha: f32,
        out: Rows<*mut f32>,
    ) {
        let (lda, tp, ldo) = (a.ld, bt.ld, out.ld);
        let vectors = tp / L;
        let mut c = 0;
        while c < vectors {
            let (bt, out) = (
                Rows::new(bt.ptr.add(c * L), tp),
                Rows::new(out.ptr.add(c * L), ldo),
            );
            let two = c + 2 <= vectors;
            match (rows == RS, two) {
                (true, true) => tile_abt::<RS, 2>(a, bt, depth, alpha, out),
                (true, false) => tile_abt::<RS, 1>(a, bt, depth, alpha, out),
                (false, _) => {
                    for r in 0..rows {
                        let (a, out) = (
                            Rows::new(a.ptr.add(r * lda), lda),
                            Rows::new(out.ptr.add(r * ldo), ldo),
                        );
                        if two {
                            tile_abt::<1, 2>(a, bt, depth, alpha, out)
                        } else {
                            tile_abt::<1, 1>(a, bt, depth, alpha, out)
                        }
                    }
                }
            }
            c += if two { 2 } else { 1 };
        }
    }

    /// `dst[dd·tp + j] = src[j·d + dd]` for j < t, zero for t ≤ j < tp: a
    /// head's columns transposed and padded.
    ///
    /// # Safety
    /// `src` addresses `t` rows of `dh` elements at stride `d`.
    #[inline]
    unsafe fn pack_transposed(
        dst: &mut [f32],
        src: *const f32,
        t: usize,
        tp: usize,
        dh: usize,
        d: usize,
    ) {
        dst.fill(0.0);
        for j in 0..t {
            for dd in 0..dh {
                dst[dd * tp + j] = *src.add(j * d + dd);
            }
        }
    }

    /// Backward pass of one (image, head): dP = do vᵀ by the tiles into
    /// `ds` (`t × tp`), dS in place, the three products with an inner
    /// dimension of `t` by faer. `vt` holds `dh × tp` floats.
    ///
    /// # Safety
    /// AVX-512F; `p` is the head's `t × t` probabilities; `dout`, `x` (q, k,
    /// v) and `grads` (dq, dk, dv) point at the head's first column of the
    /// image's first token (`t` rows at stride `d`).
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,avx")]
    pub unsafe fn head_backward(
        p: &[f32],
        dout: *const f32,
        x: Qkv<*const f32>,
        grads: Qkv<*mut f32>,
        shape: AttentionShape,
        vt: &mut [f32],
        ds: &mut [f32],
    ) {
        let (t, dh, d, scale) = (shape.tokens, shape.head_dim, shape.width(), shape.scale());
        let tp = t.div_ceil(L) * L;
        pack_transposed(vt, x.v, t, tp, dh, d);
        let mut i0 = 0;
        while i0 < t {
            let rows = RS.min(t - i0);
            // dP = do vᵀ
            rows_abt(
                rows,
                Rows::new(dout.add(i0 * d), d),
                Rows::new(vt.as_ptr(), tp),
                dh,
                1.0,
                Rows::new(ds.as_mut_ptr().add(i0 * tp), tp),
            );
            i0 += rows;
        }
        // dS = P ∘ (dP − rowsum(dP ∘ P))
        for r in 0..t {
            let (g, pr) = (&mut ds[r * tp..r * tp + t], &p[r * t..(r + 1) * t]);
            let rowsum = super::dot(g, pr);
            for (g, &pv) in g.iter_mut().zip(pr) {
                *g = pv * (*g - rowsum);
            }
        }
        // dv = Pᵀ do ;  dq = s · dS k ;  dk = s · dSᵀ q
        let ttd = (t, t, dh);
        super::gemm(
            ttd,
            1.0,
            strided(p.as_ptr(), 1, t),
            strided(dout, d, 1),
            strided(grads.v, d, 1),
        );
        super::gemm(
            ttd,
            scale,
            strided(ds.as_ptr(), tp, 1),
            strided(x.k, d, 1),
            strided(grads.q, d, 1),
        );
        super::gemm(
            ttd,
            scale,
            strided(ds.as_ptr(), 1, tp),
            strided(x.q, d, 1),
            strided(grads.k, d, 1),
        );
    }
}

static TILES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Allow or forbid the tiles for this process (`--attention-tiles`,
/// `ops::configure_cpu`); allowed unless forbidden before first use.
pub fn choose_tiles(allowed: bool) -> Result<()> {
    crate::device::set_once(&TILES, allowed, "the attention tiles (--attention-tiles)")
}

/// Whether the backward pass takes the tiles (AVX-512 and 16-wide heads;
/// see the section comment), unless `choose_tiles(false)` keeps the
/// products at every width (to pair the two paths in one build).
fn tiled(head_dim: usize) -> bool {
    *TILES.get_or_init(|| true)
        && cfg!(target_arch = "x86_64")
        && level() == Level::Avx512
        && head_dim == 16
}

#[cfg(not(target_arch = "x86_64"))]
fn tiled_backward(_: Qkv<&mut [f32]>, _: &[f32], _: Qkv<&[f32]>, _: &[f32], _: AttentionShape) {
    unreachable!("the tiled path is x86-64 only (see `tiled`)")
}

/// The backward pass with dP on the tiles.
#[cfg(target_arch = "x86_64")]
fn tiled_backward(
    grads: Qkv<&mut [f32]>,
    dout: &[f32],
    x: Qkv<&[f32]>,
    probs: &[f32],
    shape: AttentionShape,
) {
    assert!(level() == Level::Avx512, "the tiles need AVX-512");
    let (t, dh, d, heads) = (shape.tokens, shape.head_dim, shape.width(), shape.heads);
    let tp = t.div_ceil(tiles::L) * tiles::L;
    let (pq, pk, pv) = (
        SharedMut(grads.q.as_mut_ptr()),
        SharedMut(grads.k.as_mut_ptr()),
        SharedMut(grads.v.as_mut_ptr()),
    );
    (0..shape.pairs()).into_par_iter().for_each_init(
        || (vec![0f32; dh * tp], vec![0f32; t * tp]),
        |(vt, ds), bh| {
            let base = (bh / heads) * t * d + (bh % heads) * dh;
            let p = &probs[bh * t * t..(bh + 1) * t * t];
            // SAFETY: as in the forward pass, task (b, h) touches only its
            // head's columns of image b.
            unsafe {
                let at = |x: &[f32]| x.as_ptr().add(base);
                tiles::head_backward(
                    p,
                    at(dout),
                    Qkv {
                        q: at(x.q),
                        k: at(x.k),
                        v: at(x.v),
                    },
                    Qkv {
                        q: pq.get().add(base),
                        k: pk.get().add(base),
                        v: pv.get().add(base),
                    },
                    shape,
                    vt,
                    ds,
                )
            }
        },
    );
}

/// Attention of the class token's query alone (`attention::class_token_forward`):
/// one rayon task per (image, head), the scores as dots of q with each key
/// row, the softmax of `forward`, and `out = Σ_j P_j v_j` in order.
pub fn class_token_attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    x: Qkv<&[f32]>,
    shape: AttentionShape,
) {
    let Qkv { q, k, v } = x;
    let (t, dh, d, heads) = (shape.tokens, shape.head_dim, shape.width(), shape.heads);
    assert!(
        q.len() >= shape.class_token_len()
            && out.len() >= shape.class_token_len()
            && k.len() >= shape.len()
            && v.len() >= shape.len()
            && probs.len() >= shape.class_token_probs_len()
    );
    let scale = shape.scale();
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs[..shape.class_token_probs_len()]
        .par_chunks_mut(t)
        .enumerate()
        .for_each(|(bh, p)| {
            let (b, h) = (bh / heads, bh % heads);
            let (row, keys) = (b * d + h * dh, b * t * d + h * dh);
            // SAFETY: task (b, h) writes only row b, columns h*dh..(h+1)*dh of `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(row), dh) };
            let q = &q[row..row + dh];
            vectorized(
                #[inline(always)]
                || {
                    for (j, s) in p.iter_mut().enumerate() {
                        *s = scale * dot(q, &k[keys + j * d..]);
                    }
                    softmax_in_place(p);
                    o.fill(0.0);
                    for (j, &pj) in p.iter().enumerate() {
                        for (o, &vj) in o.iter_mut().zip(&v[keys + j * d..keys + j * d + dh]) {
                            *o = pj.mul_add(vj, *o);
                        }
                    }
                },
            );
        });
}

/// Backward of `class_token_attention_forward` (`attention::class_token_backward`),
/// per (image, head): dP_j = do·v_j, dS_j = P_j (dP_j − Σ P∘dP),
/// dq = s·Σ_j dS_j k_j, dk_j = s·dS_j q, dv_j = P_j do.
pub fn class_token_attention_backward(
    grads: Qkv<&mut [f32]>,
    dout: &[f32],
    x: Qkv<&[f32]>,
    probs: &[f32],
    shape: AttentionShape,
) {
    let Qkv { q, k, v } = x;
    let (t, dh, d, heads) = (shape.tokens, shape.head_dim, shape.width(), shape.heads);
    let (rows, all) = (shape.class_token_len(), shape.len());
    assert!(
        grads.q.len() >= rows
            && dout.len() >= rows
            && q.len() >= rows
            && grads.k.len() >= all
            && grads.v.len() >= all
            && k.len() >= all
            && v.len() >= all
            && probs.len() >= shape.class_token_probs_len()
    );
    let scale = shape.scale();
    let (pq, pk, pv) = (
        SharedMut(grads.q.as_mut_ptr()),
        SharedMut(grads.k.as_mut_ptr()),
        SharedMut(grads.v.as_mut_ptr()),
    );
    (0..shape.pairs()).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        let (row, keys) = (b * d + h * dh, b * t * d + h * dh);
        let (p, q, g) = (
            &probs[bh * t..(bh + 1) * t],
            &q[row..row + dh],
            &dout[row..row + dh],
        );
        let (pq, pk, pv) = (pq, pk, pv);
        let mut ds = vec![0f32; t];
        vectorized(
            #[inline(always)]
            || {
                for (j, s) in ds.iter_mut().enumerate() {
                    *s = dot(g, &v[keys + j * d..]);
                }
                let total = dot(&ds, p);
                for (s, &pj) in ds.iter_mut().zip(p) {
                    *s = pj * (*s - total);
                }
                // SAFETY: task (b, h) writes only row b of dq and rows of
                // image b of dk and dv, all in columns h*dh..(h+1)*dh.
                let dq = unsafe { std::slice::from_raw_parts_mut(pq.get().add(row), dh) };
                dq.fill(0.0);
                for (j, (&sj, &pj)) in ds.iter().zip(p).enumerate() {
                    let at = keys + j * d;
                    let (dk, dv) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(pk.get().add(at), dh),
                            std::slice::from_raw_parts_mut(pv.get().add(at), dh),
                        )
                    };
                    let sj_scaled = scale * sj;
                    for c in 0..dh {
                        dq[c] = sj.mul_add(k[at + c], dq[c]);
                        dk[c] = sj_scaled * q[c];
                        dv[c] = pj * g[c];
                    }
                }
                for x in dq.iter_mut() {
                    *x *= scale;
                }
            },
        );
    });
}

/// The slices of three buffers.
fn slices(x: Qkv<&Vec<f32>>) -> Qkv<&[f32]> {
    Qkv {
        q: x.q,
        k: x.k,
        v: x.v,
    }
}

impl AttentionKernel for Cpu {
    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        x: Qkv<&Vec<f32>>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()> {
        attention_forward(out, probs, slices(x), shape);
        Ok(())
    }
    fn attention_backward(
        &self,
        grads: Qkv<&mut Vec<f32>>,
        dout: &Vec<f32>,
        x: Qkv<&Vec<f32>>,
        probs: &Vec<f32>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()> {
        attention_backward(slices_mut(grads), dout, slices(x), probs, shape);
        Ok(())
    }
    fn class_token_attention_forward(
        &self,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        x: Qkv<&Vec<f32>>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()> {
        class_token_attention_forward(out, probs, slices(x), shape);
        Ok(())
    }
    fn class_token_attention_backward(
        &self,
        grads: Qkv<&mut Vec<f32>>,
        dout: &Vec<f32>,
        x: Qkv<&Vec<f32>>,
        probs: &Vec<f32>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()> {
        class_token_attention_backward(slices_mut(grads), dout, slices(x), probs, shape);
        Ok(())
    }
}

/// The mutable slices of three buffers.
fn slices_mut(x: Qkv<&mut Vec<f32>>) -> Qkv<&mut [f32]> {
    Qkv {
        q: x.q,
        k: x.k,
        v: x.v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, dot, fd_check, randn};

    /// The tiled backward pass against faer's products at head widths 16 to
    /// 64 (it runs at any multiple of 16; the engine takes it at 16) and
    /// token counts that leave partial row blocks and padded vectors; on a
    /// CPU without AVX-512, that the products run instead.
    #[test]
    fn tiled_backward_matches_the_products() {
        if level() != Level::Avx512 {
            assert!(!tiled(16), "the tiles need AVX-512");
            return;
        }
        assert_eq!((tiled(16), tiled(32), tiled(8)), (true, false, false));
        let mut seed = 40;
        for (batch, t, heads, dh) in [
            (2, 65, 4, 16),
            (3, 17, 2, 32),
            (2, 50, 3, 64),
            (1, 197, 2, 48),
            (2, 1, 2, 16),
            (1, 9, 3, 32),
            (1, 33, 1, 16),
            (2, 24, 2, 64),
        ] {
            let shape = AttentionShape {
                batch,
                tokens: t,
                heads,
                head_dim: dh,
            };
            let n = shape.len();
            seed += 10;
            let (q, k, v, g) = (
                randn(seed, n, 1.0),
                randn(seed + 1, n, 1.0),
                randn(seed + 2, n, 1.0),
                randn(seed + 3, n, 1.0),
            );
            let (mut o, mut p) = (vec![0f32; n], vec![0f32; shape.probs_len()]);
            let x = Qkv {
                q: &q[..],
                k: &k[..],
                v: &v[..],
            };
            products_forward(&mut o, &mut p, x, shape);
            let (mut dq_ref, mut dk_ref, mut dv_ref) =
                (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            products_backward(
                Qkv {
                    q: &mut dq_ref[..],
                    k: &mut dk_ref[..],
                    v: &mut dv_ref[..],
                },
                &g,
                x,
                &p,
                shape,
            );
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
            tiled_backward(
                Qkv {
                    q: &mut dq[..],
                    k: &mut dk[..],
                    v: &mut dv[..],
                },
                &g,
                x,
                &p,
                shape,
            );
            let what = format!("tiled attention backward, b{batch} t{t} h{heads} dh{dh}");
            for (name, got, want) in [
                ("dq", &dq, &dq_ref),
                ("dk", &dk, &dk_ref),
                ("dv", &dv, &dv_ref),
            ] {
                assert_close(
                    &format!("{what}: {name}"),
                    std::slice::from_ref(got),
                    std::slice::from_ref(want),
                    1e-5,
                );
            }
        }
        // And against finite differences of the forward pass.
        let shape = AttentionShape {
            batch: 1,
            tokens: 7,
            heads: 1,
            head_dim: 16,
        };
        let (t, n) = (shape.tokens, shape.len());
        let (q, k, v, w) = (
            randn(1, n, 1.0),
            randn(2, n, 1.0),
            randn(3, n, 1.0),
            randn(4, n, 1.0),
        );
        let forward = |q: &[f32], k: &[f32], v: &[f32]| {
            let (mut o, mut p) = (vec![0f32; n], vec![0f32; t * t]);
            products_forward(&mut o, &mut p, Qkv { q, k, v }, shape);
            (o, p)
        };
        let p = forward(&q, &k, &v).1;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let grads = Qkv {
            q: &mut dq[..],
            k: &mut dk[..],
            v: &mut dv[..],
        };
        let x = Qkv {
            q: &q[..],
            k: &k[..],
            v: &v[..],
        };
        tiled_backward(grads, &w, x, &p, shape);
        fd_check("tiled attention dq", &q, &dq, 40, |q| {
            dot(&w, &forward(q, &k, &v).0)
        });
        fd_check("tiled attention dk", &k, &dk, 40, |k| {
            dot(&w, &forward(&q, k, &v).0)
        });
        fd_check("tiled attention dv", &v, &dv, 40, |v| {
            dot(&w, &forward(&q, &k, v).0)
        });
    }
}
