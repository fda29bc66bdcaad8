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

use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Device bodies of the products (call `matmul`, `linear_forward`, `bias_backward`).
pub trait MatmulKernel: Device {
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
        _: Checked,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: &Self::Buf,
        rows: usize,
        inp: usize,
        out: usize,
        _: Checked,
    ) -> Result<()>;
    fn bias_backward(
        &self,
        dbias: &mut Self::Buf,
        dy: &Self::Buf,
        rows: usize,
        cols: usize,
        _: Checked,
    ) -> Result<()>;
}

/// `out[m, n] (+)= op(a) · op(b)` with `op(a)` of shape `[m, k]` (stored
/// `[k, m]` when `trans_a`) and `op(b)` of shape `[k, n]` (stored `[n, k]`
/// when `trans_b`). Adds to `out` when `accumulate`, else writes.
#[allow(clippy::too_many_arguments)]
pub fn matmul<D: MatmulKernel>(
    dev: &D,
    out: &mut D::Buf,
    a: &D::Buf,
    b: &D::Buf,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    need(dev, "matmul out", out, product("matmul out", &[m, n])?)?;
    need(dev, "matmul a", a, product("matmul a", &[m, k])?)?;
    need(dev, "matmul b", b, product("matmul b", &[k, n])?)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (out, if accumulate { 2 * m * n } else { m * n }),
                (a, m * k),
                (b, k * n),
            ],
            2.0 * (m * n) as f64 * k as f64,
        )
    });
    profiled(dev, "matmul", w, || {
        dev.matmul(
            out,
            a,
            b,
            m,
            n,
            k,
            trans_a,
            trans_b,
            accumulate,
            Checked::new(),
        )
    })
}

/// Dense linear layer: writes `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ + bias[out]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward<D: MatmulKernel>(
    dev: &D,
    y: &mut D::Buf,
    x: &D::Buf,
    w: &D::Buf,
    bias: &D::Buf,
    rows: usize,
    inp: usize,
    out: usize,
) -> Result<()> {
    need(dev, "linear y", y, product("linear y", &[rows, out])?)?;
    need(dev, "linear x", x, product("linear x", &[rows, inp])?)?;
    need(dev, "linear w", w, product("linear w", &[out, inp])?)?;
    need(dev, "linear bias", bias, out)?;
    let cost = dev.profiling().then(|| {
        work(
            dev,
            &[
                (y, rows * out),
                (x, rows * inp),
                (w, out * inp),
                (bias, out),
            ],
            2.0 * (rows * out) as f64 * inp as f64,
        )
    });
    profiled(dev, "linear_forward", cost, || {
        dev.linear_forward(y, x, w, bias, rows, inp, out, Checked::new())
    })
}

/// Adds the column sums of `dy[rows, cols]` to `dbias[cols]`.
pub fn bias_backward<D: MatmulKernel>(
    dev: &D,
    dbias: &mut D::Buf,
    dy: &D::Buf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    need(dev, "bias_backward dbias", dbias, cols)?;
    need(
        dev,
        "bias_backward dy",
        dy,
        product("bias_backward dy", &[rows, cols])?,
    )?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[(dy, rows * cols), (dbias, 2 * cols)],
            (rows * cols) as f64,
        )
    });
    profiled(dev, "bias_backward", w, || {
        dev.bias_backward(dbias, dy, rows, cols, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::device::{BufKind, Cpu};
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, par, randn, random, tol, RED};

    /// `op(A)[i, l]` from row-major storage.
    fn at(a: &[f32], rows: usize, cols: usize, trans: bool, i: usize, l: usize) -> f64 {
        (if trans {
            a[l * rows + i]
        } else {
            a[i * cols + l]
        }) as f64
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
                        let mut want: f64 = (0..k)
                            .map(|l| at(&a, m, k, ta, i, l) * at(&b, k, n, tb, l, j))
                            .sum();
                        if accumulate {
                            want += prior[i * n + j] as f64;
                        }
                        assert!(
                            (c[i * n + j] as f64 - want).abs() < 1e-4,
                            "ta={ta} tb={tb} acc={accumulate} [{i},{j}]"
                        );
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
                        let mut c = if accumulate {
                            prior.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
                        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
                        // SAFETY: the strides describe the buffers exactly.
                        unsafe {
                            strided_gemm(
                                m,
                                k,
                                n,
                                0.5,
                                a.as_ptr(),
                                rsa,
                                csa,
                                b.as_ptr(),
                                rsb,
                                csb,
                                accumulate,
                                c.as_mut_ptr(),
                                n as isize,
                                1,
                                threads,
                            )
                        };
                        for i in 0..m {
                            for j in 0..n {
                                let dot: f64 = (0..k)
                                    .map(|l| at(&a, m, k, ta, i, l) * at(&b, k, n, tb, l, j))
                                    .sum();
                                let want = 0.5 * dot
                                    + if accumulate {
                                        prior[i * n + j] as f64
                                    } else {
                                        0.0
                                    };
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
            let (m, n) = if c_row_major {
                (short, long)
            } else {
                (long, short)
            };
            let (rsc, csc) = if c_row_major {
                (n as isize, 1)
            } else {
                (1, m as isize)
            };
            for accumulate in [false, true] {
                for threads in [1, 2] {
                    let prior = random(m * n, 11);
                    let mut c = if accumulate {
                        prior.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    // SAFETY: A is [m, k] and B is [k, n], both row-major; C as the strides say.
                    unsafe {
                        strided_gemm(
                            m,
                            k,
                            n,
                            1.0,
                            a.as_ptr(),
                            k as isize,
                            1,
                            b.as_ptr(),
                            n as isize,
                            1,
                            accumulate,
                            c.as_mut_ptr(),
                            rsc,
                            csc,
                            threads,
                        )
                    };
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                                .sum();
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
        for (m, k, n) in [
            (1040, 192, 768),
            (400, 768, 300),
            (192, 1040, 192),
            (50, 64, 50),
            (130, 3, 129),
        ] {
            let (a, b) = (random(m * k, 7), random(k * n, 8));
            let product = |threads: usize| {
                let mut c = vec![0f32; m * n];
                // SAFETY: the strides describe the buffers exactly (B read transposed).
                unsafe {
                    strided_gemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        1,
                        k as isize,
                        false,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                        threads,
                    )
                };
                c
            };
            let one = product(1);
            for threads in [2, 3, 4] {
                let differing = one
                    .iter()
                    .zip(product(threads))
                    .filter(|(x, y)| x.to_bits() != y.to_bits())
                    .count();
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
                let want: f32 = b[o]
                    + (0..inp)
                        .map(|i| x[r * inp + i] * w[o * inp + i])
                        .sum::<f32>();
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

    #[test]
    fn wrong_shapes_are_errors() {
        let (m, n, k) = (3, 4, 5);
        let ok = |len: usize| vec![0.0f32; len];
        assert!(super::matmul(
            &Cpu,
            &mut ok(m * n),
            &ok(m * k),
            &ok(k * n),
            m,
            n,
            k,
            false,
            false,
            false
        )
        .is_ok());
        assert!(super::matmul(
            &Cpu,
            &mut ok(m * n - 1),
            &ok(m * k),
            &ok(k * n),
            m,
            n,
            k,
            false,
            false,
            false
        )
        .is_err());
        assert!(super::matmul(
            &Cpu,
            &mut ok(m * n),
            &ok(m * k - 1),
            &ok(k * n),
            m,
            n,
            k,
            true,
            false,
            false
        )
        .is_err());
        assert!(super::matmul(
            &Cpu,
            &mut ok(m * n),
            &ok(m * k),
            &ok(k * n - 1),
            m,
            n,
            k,
            false,
            true,
            true
        )
        .is_err());
        assert!(
            super::matmul(
                &Cpu,
                &mut ok(1),
                &ok(1),
                &ok(1),
                usize::MAX,
                2,
                1,
                false,
                false,
                false
            )
            .is_err(),
            "an overflowing shape"
        );
        let (rows, inp, out) = (2, 3, 4);
        for short in 0..4 {
            let len = |i: usize, n: usize| if i == short { n - 1 } else { n };
            let r = super::linear_forward(
                &Cpu,
                &mut ok(len(0, rows * out)),
                &ok(len(1, rows * inp)),
                &ok(len(2, out * inp)),
                &ok(len(3, out)),
                rows,
                inp,
                out,
            );
            assert!(r.is_err(), "linear_forward with argument {short} short");
        }
        assert!(super::bias_backward(&Cpu, &mut ok(out - 1), &ok(rows * out), rows, out).is_err());
        assert!(super::bias_backward(&Cpu, &mut ok(out), &ok(rows * out - 1), rows, out).is_err());
    }

    fn matmul_matches_the_cpu<D: Backend>(dev: &D) {
        let (m, n, k) = (77, 130, 301);
        let p = dev.precision();
        for ta in [false, true] {
            for tb in [false, true] {
                for acc in [false, true] {
                    // Activation × activation into an activation (dx = dy W with W a
                    // weight is covered by the linear test), and into an fp32 weight
                    // gradient (dW = dyᵀ x), as the model uses them.
                    for out_kind in [BufKind::Activation, BufKind::Param] {
                        let (c, g) = crate::on_both!(
                            dev,
                            vec![
                                (out_kind, randn(5, m * n, 1.0)),
                                act(randn(6, m * k, 1.0)),
                                par(randn(7, k * n, 1.0))
                            ],
                            |be, [out, a, b]| {
                                super::matmul(be, out, a, b, m, n, k, ta, tb, acc).unwrap();
                            }
                        );
                        assert_close(
                            &format!("matmul {p:?} ta={ta} tb={tb} acc={acc} out {out_kind:?}"),
                            &g,
                            &c,
                            tol(p, RED),
                        );
                    }
                }
            }
        }
    }

    fn linear_and_bias_backward_match_the_cpu<D: Backend>(dev: &D) {
        let (rows, inp, out) = (333, 96, 257);
        let inputs = vec![
            act(randn(8, rows * out, 1.0)),
            act(randn(9, rows * inp, 1.0)),
            par(randn(10, out * inp, 0.3)),
            par(randn(11, out, 1.0)),
            par(randn(12, out, 1.0)),
        ];
        let (c, g) = crate::on_both!(dev, inputs, |be, [y, x, w, bias, dbias]| {
            super::linear_forward(be, y, x, w, bias, rows, inp, out).unwrap();
            super::bias_backward(be, dbias, y, rows, out).unwrap();
        });
        assert_close(
            &format!("linear + bias backward {:?}", dev.precision()),
            &g,
            &c,
            tol(dev.precision(), RED),
        );
    }

    crate::on_every_device!(matmul_matches_the_cpu);
    crate::on_every_device!(linear_and_bias_backward_match_the_cpu);
}
