//! Matrix products on the CPU through the `gemm` crate, which takes row and
//! column strides (transposed operands need no copies) and splits large
//! products over rayon's threads.

use rayon::prelude::*;

/// `c[m, n] = alpha·c + a[m, k] · b[k, n]` with explicit (row, column)
/// strides, on `threads` threads (1 inside already-parallel code).
///
/// # Safety
/// Every element the strides address must lie inside its buffer.
#[allow(clippy::too_many_arguments)]
pub unsafe fn strided_gemm(m: usize, k: usize, n: usize, a: *const f32, rsa: isize, csa: isize, b: *const f32, rsb: isize, csb: isize, accumulate: bool, c: *mut f32, rsc: isize, csc: isize, threads: usize) {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    gemm::gemm(m, n, k, c, csc, rsc, accumulate, a, csa, rsa, b, csb, rsb, 1.0f32, 1.0f32, false, false, false, par);
}

/// Strides (row, column) of a row-major `[rows, cols]` matrix, read
/// transposed when `trans`.
fn strides(cols_stored: usize, trans: bool) -> (isize, isize) {
    if trans {
        (1, cols_stored as isize)
    } else {
        (cols_stored as isize, 1)
    }
}

/// `out[m, n] (+)= op(a)[m, k] · op(b)[k, n]` (see `Backend::matmul`).
#[allow(clippy::too_many_arguments)]
pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) {
    assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "matmul: buffers shorter than [{m},{k}]x[{k},{n}]");
    let (rsa, csa) = strides(if trans_a { m } else { k }, trans_a);
    let (rsb, csb) = strides(if trans_b { k } else { n }, trans_b);
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above guarantee every index the product touches is in bounds.
    unsafe {
        strided_gemm(m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, accumulate, out.as_mut_ptr(), n as isize, 1, rayon::current_num_threads());
    }
}

/// Writes `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ + bias`.
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], rows: usize, inp: usize, out: usize) {
    broadcast_rows(&mut y[..rows * out], &bias[..out]);
    matmul(y, x, w, rows, out, inp, false, true, true);
}

/// Fill every row of `y` with `row`.
pub fn broadcast_rows(y: &mut [f32], row: &[f32]) {
    y.par_chunks_mut(row.len()).for_each(|r| r.copy_from_slice(row));
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

/// Rows per partial sum in `column_sums`.
const ROW_CHUNK: usize = 64;

/// Σ over rows of the `cols`-long vectors that `add_row(r, acc)` adds into
/// `acc`: rows are split into chunks of 64 summed in parallel in f32 (the
/// inner loop over columns vectorizes), then the chunks are added in order
/// in f64, so the result does not depend on the thread count.
pub fn column_sums(rows: usize, cols: usize, add_row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f64> {
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cols];
            for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                add_row(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; cols];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v as f64;
        }
    }
    total
}

/// `Σ f(i)` for `i < n` in 8 independent f32 lanes (so the loop vectorizes;
/// the fixed lane order keeps it deterministic), lanes and tail added in f64.
#[inline(always)]
pub fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f64 {
    let mut lanes = [0f32; 8];
    let full = n / 8 * 8;
    for base in (0..full).step_by(8) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f(base + l);
        }
    }
    lanes.iter().map(|&v| v as f64).sum::<f64>() + (full..n).map(|i| f(i) as f64).sum::<f64>()
}
