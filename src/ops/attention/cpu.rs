//! Multi-head attention on the CPU: one rayon task per (image, head), each
//! running single-threaded strided products (faer) directly on its head's
//! columns of q, k, v and out (no copies), so every task writes only its own
//! head's columns. The backward pass at 16-wide heads computes its one
//! product over the head width on register tiles instead (the second half
//! of this file).

use super::AttentionKernel;
use crate::device::Cpu;
use crate::ops::gelu::cpu::exp;
use crate::ops::matmul::cpu::SharedMut;
use crate::ops::simd::{fold_pairwise, level, vectorized, Level};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

/// `c[m, n] = alpha · a[m, k] · b[k, n]` with explicit strides, one thread.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    csb: usize,
    c: *mut f32,
    rsc: usize,
    csc: usize,
) {
    crate::ops::matmul::cpu::strided_gemm(
        m,
        k,
        n,
        alpha,
        a,
        rsa as isize,
        csa as isize,
        b,
        rsb as isize,
        csb as isize,
        false,
        c,
        rsc as isize,
        csc as isize,
        1,
    );
}

#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) {
    let (t, d) = (tokens, heads * head_dim);
    assert!(
        q.len() >= batch * t * d
            && k.len() >= batch * t * d
            && v.len() >= batch * t * d
            && out.len() >= batch * t * d
            && probs.len() >= batch * heads * t * t
    );
    products_forward(out, probs, q, k, v, batch, tokens, heads, head_dim)
}

/// The forward pass as faer products per (image, head): the path for head
/// widths the tiles do not cover, and the baseline of `cargo bench --bench
/// cpu_ops`.
#[allow(clippy::too_many_arguments)]
pub fn products_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) {
    let (t, dh, d) = (tokens, head_dim, heads * head_dim);
    let scale = 1.0 / (dh as f32).sqrt();
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs[..batch * heads * t * t]
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
                    t,
                    dh,
                    t,
                    scale,
                    q.as_ptr().add(base),
                    d,
                    1,
                    k.as_ptr().add(base),
                    1,
                    d,
                    p.as_mut_ptr(),
                    t,
                    1,
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
                    t,
                    t,
                    dh,
                    1.0,
                    p.as_ptr(),
                    t,
                    1,
                    v.as_ptr().add(base),
                    d,
                    1,
                    o.0.add(base),
                    d,
                    1,
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

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) {
    let (t, d) = (tokens, heads * head_dim);
    let n = batch * t * d;
    assert!(
        dq.len() >= n
            && dk.len() >= n
            && dv.len() >= n
            && dout.len() >= n
            && q.len() >= n
            && k.len() >= n
            && v.len() >= n
            && probs.len() >= batch * heads * t * t
    );
    if tiled(head_dim) {
        tiled_backward(
            dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
        )
    } else {
        products_backward(
            dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
        )
    }
}

/// The backward pass as faer products per (image, head) (see
/// `products_forward`).
#[allow(clippy::too_many_arguments)]
pub fn products_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) {
    let (t, dh, d) = (tokens, head_dim, heads * head_dim);
    let scale = 1.0 / (dh as f32).sqrt();
    let (pq, pk, pv) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    (0..batch * heads).into_par_iter().for_each(|bh| {
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
                t,
                dh,
                t,
                1.0,
                dout.as_ptr().add(base),
                d,
                1,
                v.as_ptr().add(base),
                1,
                d,
                ds.as_mut_ptr(),
                t,
                1,
            );
            // dV = Pᵀ · dout
            gemm(
                t,
                t,
                dh,
                1.0,
                p.as_ptr(),
                1,
                t,
                dout.as_ptr().add(base),
                d,
                1,
                pv.0.add(base),
                d,
                1,
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
                t,
                t,
                dh,
                scale,
                ds.as_ptr(),
                t,
                1,
                k.as_ptr().add(base),
                d,
                1,
                pq.0.add(base),
                d,
                1,
            );
            gemm(
                t,
                t,
                dh,
                scale,
                ds.as_ptr(),
                1,
                t,
                q.as_ptr().add(base),
                d,
                1,
                pk.0.add(base),
                d,
                1,
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
    use std::arch::x86_64::*;

    /// Rows per block of queries (and of keys in dk, dv).
    pub const RS: usize = 8;
    /// Lanes of a vector.
    pub const L: usize = 16;

    /// `out[r][c·16..] = alpha · Σ_dd a[r·lda + dd] · bt[dd·ldb + c·16..]`
    /// for R rows and C vectors (an A·Bᵀ tile with Bᵀ packed).
    ///
    /// # Safety
    /// AVX-512F; all addressed elements lie inside their buffers.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_abt<const R: usize, const C: usize>(
        a: *const f32,
        lda: usize,
        bt: *const f32,
        ldb: usize,
        depth: usize,
        alpha: f32,
        out: *mut f32,
        ldo: usize,
    ) {
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

    /// `rows` (≤ RS) rows of `alpha · a · btᵀ` into `out` (stride `ldo`,
    /// `tp` columns), two vectors at a time.
    ///
    /// # Safety
    /// As `tile_abt`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_abt(
        rows: usize,
        a: *const f32,
        lda: usize,
        bt: *const f32,
        tp: usize,
        depth: usize,
        alpha: f32,
        out: *mut f32,
        ldo: usize,
    ) {
        let vectors = tp / L;
        let mut c = 0;
        while c < vectors {
            let (bt, out) = (bt.add(c * L), out.add(c * L));
            let two = c + 2 <= vectors;
            match (rows == RS, two) {
                (true, true) => tile_abt::<RS, 2>(a, lda, bt, tp, depth, alpha, out, ldo),
                (true, false) => tile_abt::<RS, 1>(a, lda, bt, tp, depth, alpha, out, ldo),
                (false, _) => {
                    for r in 0..rows {
                        let (a, out) = (a.add(r * lda), out.add(r * ldo));
                        if two {
                            tile_abt::<1, 2>(a, lda, bt, tp, depth, alpha, out, ldo)
                        } else {
                            tile_abt::<1, 1>(a, lda, bt, tp, depth, alpha, out, ldo)
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
    /// AVX-512F; `p` is the head's `t × t` probabilities; `dout`, `q`, `k`,
    /// `v`, `dq`, `dk`, `dv` point at the head's first column of the image's
    /// first token (`t` rows at stride `d`).
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,avx")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn head_backward(
        p: &[f32],
        dout: *const f32,
        q: *const f32,
        k: *const f32,
        v: *const f32,
        dq: *mut f32,
        dk: *mut f32,
        dv: *mut f32,
        t: usize,
        dh: usize,
        d: usize,
        scale: f32,
        vt: &mut [f32],
        ds: &mut [f32],
    ) {
        let tp = t.div_ceil(L) * L;
        pack_transposed(vt, v, t, tp, dh, d);
        let mut i0 = 0;
        while i0 < t {
            let rows = RS.min(t - i0);
            // dP = do vᵀ
            rows_abt(
                rows,
                dout.add(i0 * d),
                d,
                vt.as_ptr(),
                tp,
                dh,
                1.0,
                ds.as_mut_ptr().add(i0 * tp),
                tp,
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
        super::gemm(t, t, dh, 1.0, p.as_ptr(), 1, t, dout, d, 1, dv, d, 1);
        super::gemm(t, t, dh, scale, ds.as_ptr(), tp, 1, k, d, 1, dq, d, 1);
        super::gemm(t, t, dh, scale, ds.as_ptr(), 1, tp, q, d, 1, dk, d, 1);
    }
}

static TILES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Allow or forbid the tiles for this process (`--attention-tiles`,
/// `ops::configure_cpu`); allowed unless forbidden before first use.
pub fn choose_tiles(allowed: bool) -> Result<()> {
    crate::options::set_once(&TILES, allowed, "the attention tiles (--attention-tiles)")
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
fn tiled_backward(
    _: &mut [f32],
    _: &mut [f32],
    _: &mut [f32],
    _: &[f32],
    _: &[f32],
    _: &[f32],
    _: &[f32],
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: usize,
) {
    unreachable!("the tiled path is x86-64 only (see `tiled`)")
}

/// The backward pass with dP on the tiles.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn tiled_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    batch: usize,
    t: usize,
    heads: usize,
    dh: usize,
) {
    assert!(level() == Level::Avx512, "the tiles need AVX-512");
    let d = heads * dh;
    let scale = 1.0 / (dh as f32).sqrt();
    let tp = t.div_ceil(tiles::L) * tiles::L;
    let (pq, pk, pv) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    (0..batch * heads).into_par_iter().for_each_init(
        || (vec![0f32; dh * tp], vec![0f32; t * tp]),
        |(vt, ds), bh| {
            let base = (bh / heads) * t * d + (bh % heads) * dh;
            let p = &probs[bh * t * t..(bh + 1) * t * t];
            let (dq, dk, dv) = (pq.get(), pk.get(), pv.get());
            // SAFETY: as in the forward pass, task (b, h) touches only its
            // head's columns of image b.
            unsafe {
                tiles::head_backward(
                    p,
                    dout.as_ptr().add(base),
                    q.as_ptr().add(base),
                    k.as_ptr().add(base),
                    v.as_ptr().add(base),
                    dq.add(base),
                    dk.add(base),
                    dv.add(base),
                    t,
                    dh,
                    d,
                    scale,
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
#[allow(clippy::too_many_arguments)]
pub fn class_token_attention_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) {
    let (t, dh, d) = (tokens, head_dim, heads * head_dim);
    assert!(
        q.len() >= batch * d
            && out.len() >= batch * d
            && k.len() >= batch * t * d
            && v.len() >= batch * t * d
            && probs.len() >= batch * heads * t
    );
    let scale = 1.0 / (dh as f32).sqrt();
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs[..batch * heads * t]
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
#[allow(clippy::too_many_arguments)]
pub fn class_token_attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) {
    let (t, dh, d) = (tokens, head_dim, heads * head_dim);
    let (rows, all) = (batch * d, batch * t * d);
    assert!(
        dq.len() >= rows
            && dout.len() >= rows
            && q.len() >= rows
            && dk.len() >= all
            && dv.len() >= all
            && k.len() >= all
            && v.len() >= all
            && probs.len() >= batch * heads * t
    );
    let scale = 1.0 / (dh as f32).sqrt();
    let (pq, pk, pv) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    (0..batch * heads).into_par_iter().for_each(|bh| {
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

impl AttentionKernel for Cpu {
    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()> {
        attention_forward(out, probs, q, k, v, batch, tokens, heads, head_dim);
        Ok(())
    }
    fn attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        probs: &Vec<f32>,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()> {
        attention_backward(
            dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
        );
        Ok(())
    }
    fn class_token_attention_forward(
        &self,
        out: &mut Vec<f32>,
        probs: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()> {
        class_token_attention_forward(out, probs, q, k, v, batch, tokens, heads, head_dim);
        Ok(())
    }
    fn class_token_attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        probs: &Vec<f32>,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()> {
        class_token_attention_backward(
            dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim,
        );
        Ok(())
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
            let n = batch * t * heads * dh;
            seed += 10;
            let (q, k, v, g) = (
                randn(seed, n, 1.0),
                randn(seed + 1, n, 1.0),
                randn(seed + 2, n, 1.0),
                randn(seed + 3, n, 1.0),
            );
            let (mut o, mut p) = (vec![0f32; n], vec![0f32; batch * heads * t * t]);
            products_forward(&mut o, &mut p, &q, &k, &v, batch, t, heads, dh);
            let (mut dq_ref, mut dk_ref, mut dv_ref) =
                (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            products_backward(
                &mut dq_ref,
                &mut dk_ref,
                &mut dv_ref,
                &g,
                &q,
                &k,
                &v,
                &p,
                batch,
                t,
                heads,
                dh,
            );
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
            tiled_backward(
                &mut dq, &mut dk, &mut dv, &g, &q, &k, &v, &p, batch, t, heads, dh,
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
        let (t, dh) = (7, 16);
        let n = t * dh;
        let (q, k, v, w) = (
            randn(1, n, 1.0),
            randn(2, n, 1.0),
            randn(3, n, 1.0),
            randn(4, n, 1.0),
        );
        let forward = |q: &[f32], k: &[f32], v: &[f32]| {
            let (mut o, mut p) = (vec![0f32; n], vec![0f32; t * t]);
            products_forward(&mut o, &mut p, q, k, v, 1, t, 1, dh);
            (o, p)
        };
        let p = forward(&q, &k, &v).1;
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        tiled_backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &p, 1, t, 1, dh);
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
