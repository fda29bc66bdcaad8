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
