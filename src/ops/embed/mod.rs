//! Patch embedding input, token assembly and class-token pooling:
//!
//! ```text
//! patch_gather   patches[b·P + p, (c, y, x)] = image[b, c, py·s + y, px·s + x]
//! tokens         x[b, 0] = cls + pos[0],  x[b, 1+i] = patch_out[b, i] + pos[1+i]
//!   backward     dpatch_out[b, i] = dx[b, 1+i],  dcls += Σ_b dx[b, 0],  dpos += Σ_b dx[b]
//! cls pooling    out[b] = x[b, 0];  backward dx[b, 0] += dout[b]
//! ```
//! The patch embedding itself is a dense linear layer over the gathered
//! patches with the convolution weight `[D, C, s, s]` read as `[D, C·s·s]`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::ops::testing::{dot, fd_check, random};

    #[test]
    fn patches_follow_the_convolution_weight_order() {
        // One image, 2 channels, 4x4, patch 2: value = c*100 + y*10 + x.
        let img: Vec<f32> = (0..2).flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (c * 100 + y * 10 + x) as f32))).collect();
        let mut p = vec![0.0; 4 * 8];
        patch_gather(&mut p, &img, 1, 2, 4, 2);
        // Patch 3 is (py, px) = (1, 1): rows 2..4, cols 2..4.
        assert_eq!(&p[3 * 8..4 * 8], &[22.0, 23.0, 32.0, 33.0, 122.0, 123.0, 132.0, 133.0]);
    }

    #[test]
    fn tokens_backward_matches_finite_differences() {
        let (b, np, d) = (3, 4, 5);
        let t = np + 1;
        let (po, cls, pos, w) = (random(b * np * d, 1), random(d, 2), random(t * d, 3), random(b * t * d, 4));
        let fwd = |po: &[f32], cls: &[f32], pos: &[f32]| {
            let mut x = vec![0.0; b * t * d];
            tokens_forward(&mut x, po, cls, pos, b, np, d);
            dot(&w, &x)
        };
        let (mut dpo, mut dcls, mut dpos) = (vec![0.0; b * np * d], vec![0.0; d], vec![0.0; t * d]);
        tokens_backward(&mut dpo, &mut dcls, &mut dpos, &w, b, np, d);
        fd_check("tokens dpatch", &po, &dpo, 30, |po| fwd(po, &cls, &pos));
        fd_check("tokens dcls", &cls, &dcls, d, |cls| fwd(&po, cls, &pos));
        fd_check("tokens dpos", &pos, &dpos, 25, |pos| fwd(&po, &cls, pos));
    }

    #[test]
    fn cls_gather_and_scatter_are_adjoint() {
        let (b, t, d) = (2, 3, 4);
        let x = random(b * t * d, 1);
        let mut out = vec![0.0; b * d];
        cls_gather(&mut out, &x, b, t, d);
        assert_eq!(&out[d..], &x[t * d..t * d + d]);
        let mut dx = vec![1.0; b * t * d];
        cls_scatter_add(&mut dx, &out, b, t, d);
        assert_eq!(dx[t * d], 1.0 + out[d]);
        assert_eq!(dx[1], 1.0 + out[1]);
        assert_eq!(dx[d], 1.0);
    }
}
