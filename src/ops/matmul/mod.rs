//! Matrix products, the dense linear layer's forward, and bias gradients:
//!
//! ```text
//! matmul          C (+)= op(A) · op(B),   op = identity or transpose
//! linear forward  y = x Wᵀ + b
//! linear backward dW += dyᵀ x,  db += Σ_rows dy,  dx = dy W   (model::linear)
//! ```
//!
//! A product is described by a [`Gemm`] (C is `[m, n]`, the inner dimension
//! `k`, each operand's [`Op`] and the [`Accumulate`] mode), a dense layer by
//! a [`DenseShape`]; every layer of this module and of `ops::lowrank` takes
//! its dimensions in that order.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// How an operand of a product is read from its row-major storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored: `op(A) = A`.
    N,
    /// Transposed: `op(A) = Aᵀ` (an `[m, k]` operand stored `[k, m]`).
    T,
}

impl Op {
    pub fn is_transposed(self) -> bool {
        self == Op::T
    }
}

/// Whether a product overwrites its output or adds to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// `C = product`: the old contents of C are ignored (may be garbage or NaN).
    Overwrite,
    /// `C += product`.
    Add,
}

impl Accumulate {
    pub fn adds(self) -> bool {
        self == Accumulate::Add
    }
}

/// One product `C[m, n] (+)= op(A)[m, k] · op(B)[k, n]`: `op(A)` is stored
/// `[m, k]` (`[k, m]` when `a` is `Op::T`), `op(B)` is stored `[k, n]`
/// (`[n, k]` when `b` is `Op::T`), C is `[m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Op,
    pub b: Op,
    pub accumulate: Accumulate,
}

impl Gemm {
    /// `C[m, n] = A[m, k] · B[k, n]`: no transposes, C overwritten.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            a: Op::N,
            b: Op::N,
            accumulate: Accumulate::Overwrite,
        }
    }

    /// The same product with A read transposed.
    pub fn a_t(self) -> Self {
        Gemm { a: Op::T, ..self }
    }

    /// The same product with B read transposed.
    pub fn b_t(self) -> Self {
        Gemm { b: Op::T, ..self }
    }

    /// The same product, adding to C (`Accumulate::Add`).
    pub fn add(self) -> Self {
        self.with(Accumulate::Add)
    }

    /// The same product with the given accumulate mode.
    pub fn with(self, accumulate: Accumulate) -> Self {
        Gemm { accumulate, ..self }
    }
}

/// Shape of a dense layer applied to `rows` rows: `x[rows, inp]`,
/// `w[out, inp]`, `bias[out]`, `y[rows, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseShape {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

impl DenseShape {
    /// The product `y (+)= x · wᵀ` of this layer (`[rows, out]`, inner `inp`).
    pub fn gemm(self) -> Gemm {
        Gemm::new(self.rows, self.out, self.inp).b_t()
    }
}

/// Device bodies of the products (call `matmul`, `linear_forward`, `bias_backward`).
pub trait MatmulKernel: Device {
    fn matmul(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        g: Gemm,
        _: Checked,
    ) -> Result<()>;
    fn linear_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: &Self::Buf,
        s: DenseShape,
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

/// `out[m, n] (+)= op(a) · op(b)` as `g` describes it (see [`Gemm`]).
pub fn matmul<D: MatmulKernel>(
    dev: &D,
    out: &mut D::Buf,
    a: &D::Buf,
    b: &D::Buf,
    g: Gemm,
) -> Result<()> {
    let Gemm { m, n, k, .. } = g;
    need(dev, "matmul out", out, product("matmul out", &[m, n])?)?;
    need(dev, "matmul a", a, product("matmul a", &[m, k])?)?;
    need(dev, "matmul b", b, product("matmul b", &[k, n])?)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (
                    out,
                    if g.accumulate.adds() {
                        2 * m * n
                    } else {
                        m * n
                    },
                ),
                (a, m * k),
                (b, k * n),
            ],
            2.0 * (m * n) as f64 * k as f64,
        )
    });
    profiled(dev, "matmul", w, || {
        dev.matmul(out, a, b, g, Checked::new())
    })
}

/// Dense linear layer: writes `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ + bias[out]`.
pub fn linear_forward<D: MatmulKernel>(
    dev: &D,
    y: &mut D::Buf,
    x: &D::Buf,
    w: &D::Buf,
    bias: &D::Buf,
    s: DenseShape,
) -> Result<()> {
    let DenseShape { rows, inp, out } = s;
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
        dev.linear_forward(y, x, w, bias, s, Checked::new())
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
    use super::{Accumulate, DenseShape, Gemm, Op};
    use crate::device::{BufKind, Cpu};
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, par, randn, random, tol, RED};
    use faer::{MatMut, MatRef};

    const OPS: [Op; 2] = [Op::N, Op::T];
    const MODES: [Accumulate; 2] = [Accumulate::Overwrite, Accumulate::Add];

    /// `op(A)[i, l]` from row-major storage.
    fn at(a: &[f32], rows: usize, cols: usize, op: Op, i: usize, l: usize) -> f64 {
        (match op {
            Op::T => a[l * rows + i],
            Op::N => a[i * cols + l],
        }) as f64
    }

    /// The view of `op(A)` (`[rows, cols]`) on its row-major storage.
    fn view(a: &[f32], rows: usize, cols: usize, op: Op) -> MatRef<'_, f32> {
        match op {
            Op::N => MatRef::from_row_major_slice(a, rows, cols),
            Op::T => MatRef::from_row_major_slice(a, cols, rows).transpose(),
        }
    }

    #[test]
    fn all_transpose_combinations_match_plain_loops() {
        let (m, n, k) = (7, 5, 6);
        for (ta, tb) in OPS.into_iter().flat_map(|ta| OPS.map(|tb| (ta, tb))) {
            for accumulate in MODES {
                let (a, b) = (random(m * k, 1), random(k * n, 2));
                let prior = random(m * n, 3);
                let mut c = prior.clone();
                let g = Gemm {
                    a: ta,
                    b: tb,
                    ..Gemm::new(m, n, k).with(accumulate)
                };
                matmul(&mut c, &a, &b, g);
                for i in 0..m {
                    for j in 0..n {
                        let mut want: f64 = (0..k)
                            .map(|l| at(&a, m, k, ta, i, l) * at(&b, k, n, tb, l, j))
                            .sum();
                        if accumulate.adds() {
                            want += prior[i * n + j] as f64;
                        }
                        assert!(
                            (c[i * n + j] as f64 - want).abs() < 1e-4,
                            "ta={ta:?} tb={tb:?} acc={accumulate:?} [{i},{j}]"
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
            for (ta, tb) in OPS.into_iter().flat_map(|ta| OPS.map(|tb| (ta, tb))) {
                for accumulate in MODES {
                    for threads in [2, 3] {
                        let (a, b) = (random(m * k, 4), random(k * n, 5));
                        let prior = random(m * n, 6);
                        let mut c = if accumulate.adds() {
                            prior.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        gemm(
                            0.5,
                            view(&a, m, k, ta),
                            view(&b, k, n, tb),
                            accumulate,
                            MatMut::from_row_major_slice_mut(&mut c, m, n),
                            threads,
                        );
                        for i in 0..m {
                            for j in 0..n {
                                let dot: f64 = (0..k)
                                    .map(|l| at(&a, m, k, ta, i, l) * at(&b, k, n, tb, l, j))
                                    .sum();
                                let want = 0.5 * dot
                                    + if accumulate.adds() {
                                        prior[i * n + j] as f64
                                    } else {
                                        0.0
                                    };
                                let got = c[i * n + j] as f64;
                                assert!((got - want).abs() < 1e-4, "[{m}x{k}x{n}] ta={ta:?} tb={tb:?} acc={accumulate:?} threads={threads} [{i},{j}]: {got} vs {want}");
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
            let (rsc, csc) = if c_row_major { (n, 1) } else { (1, m) };
            for accumulate in MODES {
                for threads in [1, 2] {
                    let prior = random(m * n, 11);
                    let mut c = if accumulate.adds() {
                        prior.clone()
                    } else {
                        vec![f32::NAN; m * n]
                    };
                    // A is [m, k] and B is [k, n], both row-major; C as the strides say.
                    let c_view = if c_row_major {
                        MatMut::from_row_major_slice_mut(&mut c, m, n)
                    } else {
                        MatMut::from_column_major_slice_mut(&mut c, m, n)
                    };
                    gemm(
                        1.0,
                        view(&a[..m * k], m, k, Op::N),
                        view(&b[..k * n], k, n, Op::N),
                        accumulate,
                        c_view,
                        threads,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|l| a[i * k + l] as f64 * b[l * n + j] as f64)
                                .sum();
                            let at_c = i * rsc + j * csc;
                            let want = dot
                                + if accumulate.adds() {
                                    prior[at_c] as f64
                                } else {
                                    0.0
                                };
                            let got = c[at_c] as f64;
                            assert!((got - want).abs() < 1e-3, "[{m}x{k}x{n}] row-major C {c_row_major} acc={accumulate:?} threads={threads} [{i},{j}]: {got} vs {want}");
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
                // B read transposed.
                gemm(
                    1.0,
                    view(&a, m, k, Op::N),
                    view(&b, k, n, Op::T),
                    Accumulate::Overwrite,
                    MatMut::from_row_major_slice_mut(&mut c, m, n),
                    threads,
                );
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
        linear_forward(&mut y, &x, &w, &b, DenseShape { rows, inp, out });
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
        let g = Gemm::new(m, n, k);
        let mm = |out: usize, a: usize, b: usize, g: Gemm| {
            super::matmul(&Cpu, &mut ok(out), &ok(a), &ok(b), g)
        };
        assert!(mm(m * n, m * k, k * n, g).is_ok());
        assert!(mm(m * n - 1, m * k, k * n, g).is_err());
        assert!(mm(m * n, m * k - 1, k * n, g.a_t()).is_err());
        assert!(mm(m * n, m * k, k * n - 1, g.b_t().add()).is_err());
        assert!(
            mm(1, 1, 1, Gemm::new(usize::MAX, 2, 1)).is_err(),
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
                DenseShape { rows, inp, out },
            );
            assert!(r.is_err(), "linear_forward with argument {short} short");
        }
        assert!(super::bias_backward(&Cpu, &mut ok(out - 1), &ok(rows * out), rows, out).is_err());
        assert!(super::bias_backward(&Cpu, &mut ok(out), &ok(rows * out - 1), rows, out).is_err());
    }

    fn matmul_matches_the_cpu<D: Backend>(dev: &D) {
        let (m, n, k) = (77, 130, 301);
        let p = dev.precision();
        for ta in OPS {
            for tb in OPS {
                for acc in MODES {
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
                                let g = Gemm {
                                    a: ta,
                                    b: tb,
                                    ..Gemm::new(m, n, k).with(acc)
                                };
                                super::matmul(be, out, a, b, g).unwrap();
                            }
                        );
                        assert_close(
                            &format!(
                                "matmul {p:?} ta={ta:?} tb={tb:?} acc={acc:?} out {out_kind:?}"
                            ),
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
            super::linear_forward(be, y, x, w, bias, DenseShape { rows, inp, out }).unwrap();
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
