//! Raw bytes to model input: bilinear resize with PyTorch's
//! `interpolate(mode="bilinear", align_corners=False)` sampling, then
//! per-channel normalization:
//!
//! ```text
//! src(o) = max(0, (o + ½) · in/out − ½),  i0 = ⌊src⌋,  i1 = min(i0 + 1, in − 1),  λ = src − i0
//! v      = bilinear blend of the four taps,   y = (v/255 − mean[c]) / std[c]
//! ```
//! No backward: images are inputs.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use crate::backend::ImageTransform;

    #[test]
    fn upsampling_matches_pytorch() {
        // F.interpolate(torch.tensor([[[[0., 255.], [255., 0.]]]]), size=4,
        //               mode="bilinear", align_corners=False)[0, 0, 0]
        // = [0, 63.75, 191.25, 255]
        let src = [0u8, 255, 255, 0];
        let t = ImageTransform { channels: 1, src_height: 2, src_width: 2, dst_size: 4, mean: [0.0; 3], std: [1.0 / 255.0; 3] };
        let mut out = vec![0.0; 16];
        images_from_bytes(&mut out, &src, 1, &t);
        let row0: Vec<f32> = out[..4].to_vec();
        for (a, b) in row0.iter().zip([0.0, 63.75, 191.25, 255.0]) {
            assert!((a - b).abs() < 1e-3, "{row0:?}");
        }
        // Row 1 blends rows 0 and 1 with weight 0.25: x=0 → 0.25·255.
        assert!((out[4] - 63.75).abs() < 1e-3);
    }

    #[test]
    fn same_size_is_normalization_only() {
        let src: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        let t = ImageTransform { channels: 2, src_height: 3, src_width: 3, dst_size: 3, mean: [0.5, 0.25, 0.0], std: [0.5, 0.25, 1.0] };
        let mut out = vec![0.0; 18];
        images_from_bytes(&mut out, &src, 1, &t);
        for (i, (&o, &s)) in out.iter().zip(&src).enumerate() {
            let c = i / 9;
            assert!((o - (s as f32 / 255.0 - t.mean[c]) / t.std[c]).abs() < 1e-6);
        }
    }
}
