//! Matrix products, the dense linear layer's forward, and bias gradients:
//!
//! ```text
//! matmul          C (+)= op(A) · op(B),   op = identity or transpose
//! linear forward  y = x Wᵀ + b
//! linear backward dW += dyᵀ x,  db += Σ_rows dy,  dx = dy W   (model::linear)
//! ```

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::ops::testing::random;

    /// `op(A)[i, l]` from row-major storage.
    fn at(a: &[f32], rows: usize, cols: usize, trans: bool, i: usize, l: usize) -> f64 {
        (if trans { a[l * rows + i] } else { a[i * cols + l] }) as f64
    }

    #[test]
    fn all_transpose_combinations_match_plain_loops() {
        let (m, n, k) = (7, 5, 6);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for accumulate in [false, true] {
                let (a, b) = (random(m * k, 1), random(k * n, 2));
                let prior = random(m * n, 3);
                let mut c = prior.clone();
                matmul(&mut c, &a, &b, m, n, k, ta, tb, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 = (0..k).map(|l| at(&a, m, k, ta, i, l) * at(&b, k, n, tb, l, j)).sum();
                        if accumulate {
                            want += prior[i * n + j] as f64;
                        }
                        assert!((c[i * n + j] as f64 - want).abs() < 1e-4, "ta={ta} tb={tb} acc={accumulate} [{i},{j}]");
                    }
                }
            }
        }
    }

    /// The threaded split (rows when C is tall, columns when it is wide) on
    /// ragged sizes, every transpose, replace (C starts as NaN, so a read of
    /// it would show) and accumulate, 2 and 3 threads, against f64 loops.
    #[test]
    fn threaded_split_matches_plain_loops() {
        for (m, k, n) in [(37, 9, 5), (5, 9, 41), (130, 3, 129), (1, 4, 70)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for accumulate in [false, true] {
                    for threads in [2, 3] {
                        let (a, b) = (random(m * k, 4), random(k * n, 5));
                        let prior = random(m * n, 6);
                        let mut c = if accumulate { prior.clone() } else { vec![f32::NAN; m * n] };
                        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                        // SAFETY: the strides describe the buffers exactly.
                        unsafe { strided_gemm(m, k, n, 0.5, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, accumulate, c.as_mut_ptr(), n as isize, 1, threads) };
                        for i in 0..m {
                            for j in 0..n {
                                let dot: f64 = (0..k).map(|l| at(&a, m, k, ta, i, l) * at(&b, k, n, tb, l, j)).sum();
                                let want = 0.5 * dot + if accumulate { prior[i * n + j] as f64 } else { 0.0 };
                                let got = c[i * n + j] as f64;
                                assert!((got - want).abs() < 1e-4, "[{m}x{k}x{n}] ta={ta} tb={tb} acc={accumulate} threads={threads} [{i},{j}]: {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// A product whose C is wider than one packed block of faer (384 outputs
    /// at depth ≥ 512) runs as several faer calls, cut along C's contiguous
    /// side: row-major and column-major C, ragged last piece, replace (C
    /// starts as NaN) and accumulate, one and two threads, against f64 loops.
    #[test]
    fn pieces_of_a_wide_product_match_plain_loops() {
        let (k, long, short) = (520, 1000, 6);
        let (a, b) = (random(long * k, 9), random(k * long, 10));
        for c_row_major in [true, false] {
            // Row-major C is [short, long]; column-major C is [long, short].
            let (m, n) = if c_row_major { (short, long) } else { (long, short) };
            let (rsc, csc) = if c_row_major { (n as isize, 1) } else { (1, m as isize) };
            for accumulate in [false, true] {
                for threads in [1, 2] {
                    let prior = random(m * n, 11);
                    let mut c = if accumulate { prior.clone() } else { vec![f32::NAN; m * n] };
                    // SAFETY: A is [m, k] and B is [k, n], both row-major; C as the strides say.
                    unsafe { strided_gemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, accumulate, c.as_mut_ptr(), rsc, csc, threads) };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k).map(|l| a[i * k + l] as f64 * b[l * n + j] as f64).sum();
                            let at_c = (i as isize * rsc + j as isize * csc) as usize;
                            let want = dot + if accumulate { prior[at_c] as f64 } else { 0.0 };
                            let got = c[at_c] as f64;
                            assert!((got - want).abs() < 1e-3, "[{m}x{k}x{n}] row-major C {c_row_major} acc={accumulate} threads={threads} [{i},{j}]: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// The CPU backend promises the same bits whatever the thread count:
    /// the split only cuts C, never the sum over k.
    #[test]
    fn products_give_the_same_bits_on_any_thread_count() {
        for (m, k, n) in [(1040, 192, 768), (400, 768, 300), (192, 1040, 192), (50, 64, 50), (130, 3, 129)] {
            let (a, b) = (random(m * k, 7), random(k * n, 8));
            let product = |threads: usize| {
                let mut c = vec![0f32; m * n];
                // SAFETY: the strides describe the buffers exactly (B read transposed).
                unsafe { strided_gemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), 1, k as isize, false, c.as_mut_ptr(), n as isize, 1, threads) };
                c
            };
            let one = product(1);
            for threads in [2, 3, 4] {
                let differing = one.iter().zip(product(threads)).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                assert_eq!(differing, 0, "[{m}x{k}x{n}] {threads} threads: {differing} of {} elements differ from 1 thread", m * n);
            }
        }
    }

    #[test]
    fn linear_adds_the_bias_and_bias_backward_sums_columns() {
        let (rows, inp, out) = (4, 3, 130);
        let (x, w, b) = (random(rows * inp, 1), random(out * inp, 2), random(out, 3));
        let mut y = vec![0.0; rows * out];
        linear_forward(&mut y, &x, &w, &b, rows, inp, out);
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = b[o] + (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum::<f32>();
                assert!((y[r * out + o] - want).abs() < 1e-5);
            }
        }
        let mut db = vec![1.0; out];
        bias_backward(&mut db, &y, rows, out);
        for o in 0..out {
            let want = 1.0 + (0..rows).map(|r| y[r * out + o]).sum::<f32>();
            assert!((db[o] - want).abs() < 1e-5);
        }
    }
}
