//! Matrix products on the CPU through `faer`'s matmul, which takes row and
//! column strides (transposed operands and per-head views need no copies),
//! runs AVX-512 kernels on stable Rust where the CPU has them (AVX2 + FMA
//! otherwise); large products are split over rayon's threads here. The
//! products take faer views (`MatRef`/`MatMut`): shape and strides in one
//! value per operand.

use super::{Accumulate, DenseShape, Gemm, MatmulKernel, Op};
use crate::device::Cpu;
use crate::ops::simd::vectorized;
use crate::ops::Checked;
use anyhow::Result;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// `c[m, n] (+)= alpha · a[m, k] · b[k, n]` on faer views (any row and
/// column strides), on `threads` threads (1 inside already-parallel code).
/// With `Accumulate::Overwrite` the old contents of `c` are ignored (may be
/// garbage or NaN).
///
/// With several threads, C is cut into one range of rows (or of columns,
/// when it is wider than tall) per thread and each thread runs a
/// single-threaded product on its range. Measured against faer's own
/// parallel split (`cargo bench --bench cpu`, alternating, two runs each):
/// training step 144.6 / 144.2 against 135.4 / 138.0 images/s, ViT-B/32
/// forward the same within noise.
pub fn gemm(
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    accumulate: Accumulate,
    c: MatMut<'_, f32>,
    threads: usize,
) {
    assert!(
        a.nrows() == c.nrows() && b.ncols() == c.ncols() && a.ncols() == b.nrows(),
        "gemm: [{}x{}] · [{}x{}] into [{}x{}]",
        a.nrows(),
        a.ncols(),
        b.nrows(),
        b.ncols(),
        c.nrows(),
        c.ncols()
    );
    let (m, n) = (c.nrows(), c.ncols());
    let along_columns = n > m;
    let len = if along_columns { n } else { m };
    // Ranges in multiples of 16 elements (64 bytes: whole cache lines of C
    // when the columns are cut).
    let chunk = len.div_ceil(threads.max(1)).div_ceil(16) * 16;
    if threads <= 1 || chunk >= len {
        serial_gemm(alpha, a, b, accumulate, c);
        return;
    }
    // Each task gets its own rows (columns) of C.
    let parts: Vec<_> = PartsOfC::new(a, b, c, along_columns, chunk).collect();
    parts
        .into_par_iter()
        .for_each(|(a, b, c)| serial_gemm(alpha, a, b, accumulate, c));
}

/// The operands of consecutive pieces of C: its rows (or columns, when
/// `along_columns`) cut into ranges of `piece` (the last one ragged), each
/// with the matching rows of A (or columns of B). Used by the thread split
/// and by the cut into faer calls.
struct PartsOfC<'a> {
    a: MatRef<'a, f32>,
    b: MatRef<'a, f32>,
    /// The rest of C (`None` once it is used up).
    c: Option<MatMut<'a, f32>>,
    along_columns: bool,
    piece: usize,
}

impl<'a> PartsOfC<'a> {
    fn new(
        a: MatRef<'a, f32>,
        b: MatRef<'a, f32>,
        c: MatMut<'a, f32>,
        along_columns: bool,
        piece: usize,
    ) -> Self {
        PartsOfC {
            a,
            b,
            c: Some(c),
            along_columns,
            piece,
        }
    }
}

impl<'a> Iterator for PartsOfC<'a> {
    type Item = (MatRef<'a, f32>, MatRef<'a, f32>, MatMut<'a, f32>);

    fn next(&mut self) -> Option<Self::Item> {
        let c = self.c.take()?;
        let len = if self.along_columns {
            c.ncols()
        } else {
            c.nrows()
        };
        if len == 0 {
            return None;
        }
        let take = self.piece.min(len);
        let (a, b, c) = if self.along_columns {
            let (c, rest) = c.split_at_col_mut(take);
            let (b, b_rest) = self.b.split_at_col(take);
            self.b = b_rest;
            self.c = Some(rest);
            (self.a, b, c)
        } else {
            let (c, rest) = c.split_at_row_mut(take);
            let (a, a_rest) = self.a.split_at_row(take);
            self.a = a_rest;
            self.c = Some(rest);
            (a, self.b, c)
        };
        Some((a, b, c))
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer (or only
/// reading it) may share. Used by the attention op.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so that closures capture the `SharedMut`, not the
    /// raw pointer inside it.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Bytes of the packed block of the first operand that faer keeps in L2 per
/// call (below).
const PACKED_BLOCK_BYTES: usize = 768 << 10;
/// Depth of faer's packed blocks (`kc`, fixed in private-gemm-x86).
const FAER_KC: usize = 512;

/// One product on the calling thread, as a few faer calls. faer makes the
/// contiguous side of C the rows of its micro-kernel (96 per tile) and packs
/// the operand along that side (the weights, for `x·Wᵀ`) into one block of
/// `len × min(k, 512)` floats, which is swept once per four columns of the
/// other operand and must stay in L2. A 1536-wide block (ViT-B/32 fc1 on
/// two threads) is 3 MiB and does not; cut into pieces of at most 768 KiB
/// of block (384 outputs at depth ≥ 512), `cargo bench --bench cpu_ops`
/// (fc1 with twelve cold weight matrices, alternating with the uncut code)
/// measured 292-322 against 286-290 GFLOP/s.
fn serial_gemm(
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    accumulate: Accumulate,
    c: MatMut<'_, f32>,
) {
    // faer's micro-kernel rows run along C's contiguous side: columns of a row-major C.
    let along_columns = c.row_stride().unsigned_abs() > c.col_stride().unsigned_abs();
    let k = a.ncols();
    let piece = (PACKED_BLOCK_BYTES / (4 * k.clamp(1, FAER_KC))).max(96) / 96 * 96;
    for (a, b, c) in PartsOfC::new(a, b, c, along_columns, piece) {
        faer_gemm(alpha, a, b, accumulate, c);
    }
}

/// One faer call on the calling thread.
fn faer_gemm(
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    accumulate: Accumulate,
    c: MatMut<'_, f32>,
) {
    let accum = match accumulate {
        Accumulate::Add => Accum::Add,
        Accumulate::Overwrite => Accum::Replace,
    };
    faer::linalg::matmul::matmul(c, accum, a, b, alpha, Par::Seq);
    clear_upper_vector_state();
}

/// Runs `vzeroupper` (where the CPU has AVX). faer's AVX-512 kernels are
/// generated assembly that returns with the upper halves of the vector
/// registers still dirty; on such a thread every SSE-encoded instruction
/// (all of this crate's baseline x86-64 code: LayerNorm, GELU, softmax, ...)
/// then pays a state-transition penalty. Measured (`cargo bench --bench
/// cpu`): the vit-cifar training step ran at 80 images/s without this and
/// 140 with it.
#[inline]
fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked just above.
        unsafe { vzeroupper() }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn vzeroupper() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// `op(x)` of a row-major `[rows, cols]` operand as stored (`[cols, rows]`
/// when transposed).
fn operand(x: &[f32], rows: usize, cols: usize, op: Op) -> MatRef<'_, f32> {
    match op {
        Op::N => MatRef::from_row_major_slice(&x[..rows * cols], rows, cols),
        Op::T => MatRef::from_row_major_slice(&x[..rows * cols], cols, rows).transpose(),
    }
}

/// `out[m, n] (+)= op(a)[m, k] · op(b)[k, n]` (see `ops::matmul::matmul`).
pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], g: Gemm) {
    let Gemm { m, n, k, .. } = g;
    assert!(
        out.len() >= m * n && a.len() >= m * k && b.len() >= k * n,
        "matmul: buffers shorter than [{m},{k}]x[{k},{n}]"
    );
    if k == 0 {
        if !g.accumulate.adds() {
            out[..m * n].fill(0.0);
        }
        return;
    }
    gemm(
        1.0,
        operand(a, m, k, g.a),
        operand(b, k, n, g.b),
        g.accumulate,
        MatMut::from_row_major_slice_mut(&mut out[..m * n], m, n),
        rayon::current_num_threads(),
    );
}

/// Writes `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ + bias`.
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], s: DenseShape) {
    if s.rows * s.out == 0 {
        return;
    }
    broadcast_rows(&mut y[..s.rows * s.out], &bias[..s.out]);
    matmul(y, x, w, s.gemm().add());
}

/// Fill every row of `y` with `row`.
pub fn broadcast_rows(y: &mut [f32], row: &[f32]) {
    y.par_chunks_mut(row.len())
        .for_each(|r| r.copy_from_slice(row));
}

/// Adds the column sums of `dy[rows, cols]` to `dbias`.
pub fn bias_backward(dbias: &mut [f32], dy: &[f32], rows: usize, cols: usize) {
    let sums = column_sums(rows, cols, |r, out| {
        for (o, v) in out.iter_mut().zip(&dy[r * cols..(r + 1) * cols]) {
            *o += v;
        }
    });
    for (d, s) in dbias[..cols].iter_mut().zip(sums) {
        *d += s as f32;
    }
}

/// Rows per partial sum in `column_sums` (and in LayerNorm's backward).
pub const ROW_CHUNK: usize = 64;

/// Σ over rows of the `cols`-long vectors that `add_row(r, acc)` adds into
/// `acc`: rows are split into chunks of 64 summed in parallel in f32 (the
/// inner loop over columns vectorizes), then the chunks are added in order
/// in f64, so the result does not depend on the thread count.
pub fn column_sums(
    rows: usize,
    cols: usize,
    add_row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f64> {
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cols];
            vectorized(
                #[inline(always)]
                || {
                    for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                        add_row(r, &mut acc);
                    }
                },
            );
            acc
        })
        .collect();
    sum_in_order(partials, cols)
}

/// The `cols`-long partial sums added in their order in f64 (the last step
/// of `column_sums` and of LayerNorm's backward).
pub fn sum_in_order(partials: Vec<Vec<f32>>, cols: usize) -> Vec<f64> {
    let mut total = vec![0f64; cols];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v as f64;
        }
    }
    total
}

impl MatmulKernel for Cpu {
    fn matmul(
        &self,
        out: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        g: Gemm,
        _: Checked,
    ) -> Result<()> {
        matmul(out, a, b, g);
        Ok(())
    }
    fn linear_forward(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        bias: &Vec<f32>,
        s: DenseShape,
        _: Checked,
    ) -> Result<()> {
        linear_forward(y, x, w, bias, s);
        Ok(())
    }
    fn bias_backward(
        &self,
        dbias: &mut Vec<f32>,
        dy: &Vec<f32>,
        rows: usize,
        cols: usize,
        _: Checked,
    ) -> Result<()> {
        bias_backward(dbias, dy, rows, cols);
        Ok(())
    }
}
