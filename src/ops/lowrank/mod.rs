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

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::ops::testing::random;

    #[test]
    fn equals_the_dense_layer_of_the_product() {
        let (rows, inp, r, out) = (6, 10, 3, 8);
        let (x, v, u, b) = (random(rows * inp, 1), random(r * inp, 2), random(out * r, 3), random(out, 4));
        let (mut y, mut h) = (vec![0.0; rows * out], vec![0.0; rows * r]);
        lowrank_forward(&mut y, &mut h, &x, &v, &u, &b, rows, inp, r, out);
        let mut w = vec![0f32; out * inp];
        crate::ops::matmul::cpu::matmul(&mut w, &u, &v, out, inp, r, false, false, false);
        let mut dense = vec![0.0; rows * out];
        crate::ops::matmul::cpu::linear_forward(&mut dense, &x, &w, &b, rows, inp, out);
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
}
