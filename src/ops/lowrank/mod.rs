//! The low-rank linear layer, `W ≈ U V` with `V: [r, in]`, `U: [out, r]`:
//!
//! ```text
//! forward   h = x Vᵀ  [rows, r],   y = h Uᵀ + b  [rows, out]
//! backward  dU += dyᵀ h,  db += Σ_rows dy,  dh = dy U,  dV += dhᵀ x,  dx = dh V
//! ```
//! The CUDA kernel keeps each row tile's `h` on chip between the two
//! products (and also writes it, for the backward pass). The backward pass
//! is four matrix products (`model::linear`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::matmul::{DenseShape, Gemm};
use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Shape of a low-rank layer applied to `rows` rows: `x[rows, inp]`,
/// `v[rank, inp]`, `h[rows, rank]`, `u[out, rank]`, `bias[out]`, `y[rows, out]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowRankShape {
    pub rows: usize,
    pub inp: usize,
    pub rank: usize,
    pub out: usize,
}

impl LowRankShape {
    /// The first product, `h[rows, rank] = x · vᵀ` (written).
    pub fn first(self) -> Gemm {
        Gemm::new(self.rows, self.rank, self.inp).b_t()
    }

    /// The second product as a dense layer, `y = h · uᵀ + bias`.
    pub fn second(self) -> DenseShape {
        DenseShape {
            rows: self.rows,
            inp: self.rank,
            out: self.out,
        }
    }

    /// `[rows, inp, rank, out]`.
    pub fn dims(self) -> [usize; 4] {
        [self.rows, self.inp, self.rank, self.out]
    }
}

/// The parameters of a low-rank layer: `v[rank, inp]`, `u[out, rank]`, `bias[out]`.
pub struct LowRankWeights<'a, T: ?Sized> {
    pub v: &'a T,
    pub u: &'a T,
    pub bias: &'a T,
}

impl<T: ?Sized> Clone for LowRankWeights<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for LowRankWeights<'_, T> {}

/// Device body of the low-rank forward (call `forward`).
pub trait LowRankKernel: Device {
    fn lowrank_forward(
        &self,
        y: &mut Self::Buf,
        h: &mut Self::Buf,
        x: &Self::Buf,
        w: LowRankWeights<'_, Self::Buf>,
        s: LowRankShape,
        _: Checked,
    ) -> Result<()>;
}

/// The checks of `forward`, for callers that pick a device's path
/// themselves (the CUDA benches and the fused-kernel test): the token they
/// need to call it.
pub fn check_forward<D: Device>(
    dev: &D,
    y: &D::Buf,
    h: &D::Buf,
    x: &D::Buf,
    w: LowRankWeights<'_, D::Buf>,
    s: LowRankShape,
) -> Result<Checked> {
    let LowRankShape {
        rows,
        inp,
        rank,
        out,
    } = s;
    if rank == 0 {
        anyhow::bail!("lowrank: rank 0");
    }
    need(dev, "lowrank y", y, product("lowrank y", &[rows, out])?)?;
    need(dev, "lowrank h", h, product("lowrank h", &[rows, rank])?)?;
    need(dev, "lowrank x", x, product("lowrank x", &[rows, inp])?)?;
    need(dev, "lowrank v", w.v, product("lowrank v", &[rank, inp])?)?;
    need(dev, "lowrank u", w.u, product("lowrank u", &[out, rank])?)?;
    need(dev, "lowrank bias", w.bias, out)?;
    Ok(Checked::new())
}

/// Writes `h[rows, r] = x · vᵀ` and `y[rows, out] = h · uᵀ + bias`, with
/// `v: [r, inp]`, `u: [out, r]`. `h` is kept for the backward pass (`dU = dyᵀ h`).
pub fn forward<D: LowRankKernel>(
    dev: &D,
    y: &mut D::Buf,
    h: &mut D::Buf,
    x: &D::Buf,
    w: LowRankWeights<'_, D::Buf>,
    s: LowRankShape,
) -> Result<()> {
    let ok = check_forward(dev, y, h, x, w, s)?;
    let LowRankShape {
        rows,
        inp,
        rank,
        out,
    } = s;
    let cost = dev.profiling().then(|| {
        work(
            dev,
            &[
                (y, rows * out),
                (h, rows * rank),
                (x, rows * inp),
                (w.v, rank * inp),
                (w.u, out * rank),
                (w.bias, out),
            ],
            2.0 * (rows * rank) as f64 * (inp + out) as f64,
        )
    });
    profiled(dev, "lowrank_forward", cost, || {
        dev.lowrank_forward(y, h, x, w, s, ok)
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{LowRankShape, LowRankWeights};
    use crate::device::Cpu;
    use crate::ops::matmul::{DenseShape, Gemm};
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, par, randn, random, tol, RED};

    #[test]
    fn equals_the_dense_layer_of_the_product() {
        let (rows, inp, r, out) = (6, 10, 3, 8);
        let (x, v, u, b) = (
            random(rows * inp, 1),
            random(r * inp, 2),
            random(out * r, 3),
            random(out, 4),
        );
        let (mut y, mut h) = (vec![0.0; rows * out], vec![0.0; rows * r]);
        let s = LowRankShape {
            rows,
            inp,
            rank: r,
            out,
        };
        let weights = LowRankWeights {
            v: &v[..],
            u: &u[..],
            bias: &b[..],
        };
        lowrank_forward(&mut y, &mut h, &x, weights, s);
        let mut w = vec![0f32; out * inp];
        crate::ops::matmul::cpu::matmul(&mut w, &u, &v, Gemm::new(out, inp, r));
        let mut dense = vec![0.0; rows * out];
        crate::ops::matmul::cpu::linear_forward(
            &mut dense,
            &x,
            &w,
            &b,
            DenseShape { rows, inp, out },
        );
        for (a, d) in y.iter().zip(&dense) {
            assert!((a - d).abs() < 1e-4, "{a} vs {d}");
        }
        for i in 0..rows {
            for k in 0..r {
                let want: f32 = (0..inp).map(|j| x[i * inp + j] * v[k * inp + j]).sum();
                assert!((h[i * r + k] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let (rows, inp, r, out) = (3, 5, 2, 4);
        let s = LowRankShape {
            rows,
            inp,
            rank: r,
            out,
        };
        let lens = [rows * out, rows * r, rows * inp, r * inp, out * r, out];
        for short in 0..=lens.len() {
            let b: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &n)| vec![0.0; if i == short { n - 1 } else { n }])
                .collect();
            let (mut y, mut h) = (b[0].clone(), b[1].clone());
            let w = LowRankWeights {
                v: &b[3],
                u: &b[4],
                bias: &b[5],
            };
            let res = super::forward(&Cpu, &mut y, &mut h, &b[2], w, s);
            assert_eq!(res.is_ok(), short == lens.len(), "argument {short} short");
        }
        let (mut y, mut h) = (vec![0.0; 12], vec![0.0; 12]);
        assert!(
            super::forward(
                &Cpu,
                &mut y,
                &mut h,
                &vec![0.0; 15],
                LowRankWeights {
                    v: &vec![0.0; 10],
                    u: &vec![0.0; 8],
                    bias: &vec![0.0; 4],
                },
                LowRankShape { rank: 0, ..s }
            )
            .is_err(),
            "rank 0"
        );
    }

    fn forward_matches_the_cpu<D: Backend>(dev: &D) {
        let p = dev.precision();
        // Ragged shapes (generic kernels), and all-multiples-of-16 shapes
        // (the aligned bf16 kernel), ranks up to the fused limit and past it.
        for (rows, inp, out) in [
            (1000, 192, 300),
            (77, 24, 10),
            (1600, 768, 768),
            (208, 3072, 768),
            (96, 768, 3072),
        ] {
            for rank in [1, 3, 16, 17, 64, 100, 128, 256, 300] {
                let inputs = vec![
                    act(vec![0.0; rows * out]),
                    act(vec![0.0; rows * rank]),
                    act(randn(13, rows * inp, 1.0)),
                    par(randn(14, rank * inp, 0.1)),
                    par(randn(15, out * rank, 0.1)),
                    par(randn(16, out, 1.0)),
                ];
                let s = LowRankShape {
                    rows,
                    inp,
                    rank,
                    out,
                };
                let (c, g) = crate::on_both!(dev, inputs, |be, [y, h, x, v, u, bias]| {
                    super::forward(be, y, h, x, LowRankWeights { v, u, bias }, s).unwrap();
                });
                assert_close(
                    &format!("lowrank {p:?} rows {rows} in {inp} out {out} rank {rank}"),
                    &g,
                    &c,
                    tol(p, RED),
                );
            }
        }
    }

    crate::on_every_device!(forward_matches_the_cpu);

    /// The fused kernels themselves (`forward` picks the cuBLAS pair where
    /// that is faster): generic and aligned bf16 kernels, fp32 SIMT.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn fused_kernels_directly_match_the_cpu() {
        use crate::device::{BufKind, Device, Precision};
        for p in [Precision::F32, Precision::Bf16] {
            let cuda = crate::testing::cuda(p);
            for (rows, inp, out) in [
                (1000, 192, 300),
                (77, 24, 10),
                (1600, 768, 768),
                (208, 3072, 768),
                (96, 768, 3072),
            ] {
                for rank in [1, 3, 16, 17, 32, 64, 100, 128, 256] {
                    let inputs = crate::testing::rounded(
                        &cuda,
                        vec![
                            act(randn(13, rows * inp, 1.0)),
                            par(randn(14, rank * inp, 0.1)),
                            par(randn(15, out * rank, 0.1)),
                            par(randn(16, out, 1.0)),
                        ],
                    );
                    let s = LowRankShape {
                        rows,
                        inp,
                        rank,
                        out,
                    };
                    let (mut yc, mut hc) = (vec![0.0; rows * out], vec![0.0; rows * rank]);
                    let weights = LowRankWeights {
                        v: &inputs[1].1,
                        u: &inputs[2].1,
                        bias: &inputs[3].1,
                    };
                    super::forward(&Cpu, &mut yc, &mut hc, &inputs[0].1, weights, s).unwrap();
                    let up = |(k, v): &(BufKind, Vec<f32>)| cuda.upload(v, *k).unwrap();
                    let (x, v, u, b) = (
                        up(&inputs[0]),
                        up(&inputs[1]),
                        up(&inputs[2]),
                        up(&inputs[3]),
                    );
                    let (mut y, mut h) = (
                        cuda.upload(&vec![f32::NAN; rows * out], BufKind::Activation)
                            .unwrap(),
                        cuda.upload(&vec![f32::NAN; rows * rank], BufKind::Activation)
                            .unwrap(),
                    );
                    let w = LowRankWeights {
                        v: &v,
                        u: &u,
                        bias: &b,
                    };
                    let ok = super::check_forward(&cuda, &y, &h, &x, w, s).unwrap();
                    super::cuda::lowrank_forward_fused(&cuda, &mut y, &mut h, &x, w, s, ok)
                        .unwrap();
                    let got = vec![cuda.download(&y).unwrap(), cuda.download(&h).unwrap()];
                    assert_close(
                        &format!("fused lowrank {p:?} rows {rows} in {inp} out {out} rank {rank}"),
                        &got,
                        &[yc, hc],
                        tol(p, RED),
                    );
                }
            }
        }
    }
}
