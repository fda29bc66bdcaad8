//! Multi-head self-attention core (Vaswani et al.), per image and head,
//! with `q, k, v, o: [T, dh]` the head's columns and `s = 1/√dh`:
//!
//! ```text
//! forward   P = softmax_rows(s · q kᵀ),  o = P v
//! backward  dP = do vᵀ,  dv = Pᵀ do,
//!           dS = P ∘ (dP − rowsum(dP ∘ P)),  dq = s · dS k,  dk = s · dSᵀ q
//! ```
//! `P` is kept for the backward pass.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::ops::testing::{dot, fd_check, random};

    const B: usize = 2;
    const T: usize = 5;
    const H: usize = 2;
    const DH: usize = 4;
    const N: usize = B * T * H * DH;

    fn forward(q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (mut o, mut p) = (vec![0.0; N], vec![0.0; B * H * T * T]);
        attention_forward(&mut o, &mut p, q, k, v, B, T, H, DH);
        (o, p)
    }

    /// Plain loops in f64, for the forward values.
    fn naive(q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let d = H * DH;
        let mut o = vec![0f64; N];
        for b in 0..B {
            for h in 0..H {
                for i in 0..T {
                    let at = |x: &[f32], t: usize, c: usize| x[(b * T + t) * d + h * DH + c] as f64;
                    let s: Vec<f64> = (0..T).map(|j| (0..DH).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>() / (DH as f64).sqrt()).collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..DH {
                        o[(b * T + i) * d + h * DH + c] = (0..T).map(|j| e[j] / z * at(v, j, c)).sum();
                    }
                }
            }
        }
        o
    }

    #[test]
    fn forward_matches_plain_loops() {
        let (q, k, v) = (random(N, 1), random(N, 2), random(N, 3));
        let (o, _) = forward(&q, &k, &v);
        for (a, b) in o.iter().zip(naive(&q, &k, &v)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (q, k, v, w) = (random(N, 1), random(N, 2), random(N, 3), random(N, 4));
        let (_, p) = forward(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; N], vec![0.0; N], vec![0.0; N]);
        attention_backward(&mut dq, &mut dk, &mut dv, &w, &q, &k, &v, &p, B, T, H, DH);
        fd_check("attention dq", &q, &dq, 40, |q| dot(&w, &forward(q, &k, &v).0));
        fd_check("attention dk", &k, &dk, 40, |k| dot(&w, &forward(&q, k, &v).0));
        fd_check("attention dv", &v, &dv, 40, |v| dot(&w, &forward(&q, &k, v).0));
    }
}
