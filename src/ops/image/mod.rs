//! Raw bytes to model input: bilinear resize with PyTorch's
//! `interpolate(mode="bilinear", align_corners=False)` sampling, then
//! per-channel normalization:
//!
//! ```text
//! src(o) = max(0, (o + ½) · in/out − ½),  i0 = ⌊src⌋,  i1 = min(i0 + 1, in − 1),  λ = src − i0
//! v      = bilinear blend of the four taps,   y = (v/255 − mean[c]) / std[c]
//! ```
//! With `resize = Some(R)` the image is resized to R x R instead and the
//! center `dst_size` x `dst_size` square is kept (torchvision's `Resize(R)`
//! then `CenterCrop(dst)`): output pixel `o` is pixel `o + off` of the
//! resized image, `off = round((R − dst) / 2)` with Python's round half to
//! even, as torchvision's `center_crop` computes it. No pixel outside the
//! crop is computed. No backward: images are inputs.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, product, Checked};
use crate::device::Device;
use anyhow::{bail, Result};

/// Per-channel normalization and geometry for turning raw images into model
/// input: the settings of `from_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ImageTransform {
    pub channels: usize,
    /// Source height and width (the stored images, after augmentation).
    pub src_height: usize,
    pub src_width: usize,
    /// Model input size (square).
    pub dst_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Resize to this square size first, then keep the center `dst_size`
    /// square (the reference protocol: 256, then 224). None: resize straight
    /// to `dst_size`. Left out of the serialized form when None, so the keys
    /// built from a transform (the teacher-logit cache) keep their old value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
}

impl ImageTransform {
    /// The side of the resized image and the offset of the kept square in
    /// it: `(dst_size, 0)` without `resize`.
    pub fn resized(&self) -> (usize, usize) {
        match self.resize {
            Some(r) => (r, center_offset(r, self.dst_size)),
            None => (self.dst_size, 0),
        }
    }
}

/// Offset of a centered `crop` inside `size` (`crop <= size`):
/// torchvision's `int(round((size - crop) / 2))`, where Python rounds a
/// half to the even neighbour (an odd difference 2k + 1 gives k or k + 1,
/// whichever is even).
pub fn center_offset(size: usize, crop: usize) -> usize {
    let diff = size - crop;
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Device body of the image op (call `from_bytes`).
pub trait ImageKernel: Device {
    fn images_from_bytes(
        &self,
        out: &mut Self::Buf,
        src: &[u8],
        batch: usize,
        t: &ImageTransform,
        _: Checked,
    ) -> Result<()>;
}

/// Writes model input `out[batch, channels, dst, dst]` from raw bytes
/// `src[batch, channels, src_h, src_w]`: bilinear resize with
/// PyTorch's `interpolate(mode="bilinear", align_corners=False)`
/// sampling (to `resize` and a center crop when given), then
/// `(value/255 - mean[c]) / std[c]`.
pub fn from_bytes<D: ImageKernel>(
    dev: &D,
    out: &mut D::Buf,
    src: &[u8],
    batch: usize,
    t: &ImageTransform,
) -> Result<()> {
    if t.channels == 0 || t.channels > 3 {
        bail!(
            "images_from_bytes: {} channels; 1 to 3 are supported",
            t.channels
        );
    }
    if t.src_height == 0 || t.src_width == 0 || t.dst_size == 0 {
        bail!(
            "images_from_bytes: empty images ({}x{} to {})",
            t.src_height,
            t.src_width,
            t.dst_size
        );
    }
    if let Some(r) = t.resize.filter(|&r| r < t.dst_size) {
        bail!(
            "images_from_bytes: cannot center-crop {} pixels from images resized to {r}",
            t.dst_size
        );
    }
    if let Some(s) = t.std[..t.channels]
        .iter()
        .find(|s| !s.is_finite() || **s == 0.0)
    {
        bail!("images_from_bytes: standard deviation {s} cannot normalize");
    }
    let in_len = product(
        "images_from_bytes",
        &[batch, t.channels, t.src_height, t.src_width],
    )?;
    if src.len() < in_len {
        bail!(
            "images_from_bytes: {} bytes for {batch} images of {}x{}x{}",
            src.len(),
            t.channels,
            t.src_height,
            t.src_width
        );
    }
    need(
        dev,
        "images_from_bytes out",
        out,
        product(
            "images_from_bytes out",
            &[batch, t.channels, t.dst_size, t.dst_size],
        )?,
    )?;
    dev.images_from_bytes(out, &src[..in_len], batch, t, Checked::new())
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::ImageTransform;
    use crate::device::Cpu;
    use crate::ops::Backend;
    use crate::rng::Rng;
    use crate::testing::{act, assert_close, tol, EW};

    #[test]
    fn upsampling_matches_pytorch() {
        // F.interpolate(torch.tensor([[[[0., 255.], [255., 0.]]]]), size=4,
        //               mode="bilinear", align_corners=False)[0, 0, 0]
        // = [0, 63.75, 191.25, 255]
        let src = [0u8, 255, 255, 0];
        let t = ImageTransform {
            channels: 1,
            src_height: 2,
            src_width: 2,
            dst_size: 4,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            resize: None,
        };
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
        let t = ImageTransform {
            channels: 2,
            src_height: 3,
            src_width: 3,
            dst_size: 3,
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
            resize: None,
        };
        let mut out = vec![0.0; 18];
        images_from_bytes(&mut out, &src, 1, &t);
        for (i, (&o, &s)) in out.iter().zip(&src).enumerate() {
            let c = i / 9;
            assert!((o - (s as f32 / 255.0 - t.mean[c]) / t.std[c]).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_transforms_and_short_buffers_are_errors() {
        let t = ImageTransform {
            channels: 3,
            src_height: 4,
            src_width: 4,
            dst_size: 2,
            mean: [0.0; 3],
            std: [1.0; 3],
            resize: None,
        };
        let (src, mut out) = (vec![0u8; 48], vec![0.0f32; 12]);
        assert!(super::from_bytes(&Cpu, &mut out, &src, 1, &t).is_ok());
        assert!(
            super::from_bytes(&Cpu, &mut out, &src[..47], 1, &t).is_err(),
            "short source"
        );
        assert!(
            super::from_bytes(&Cpu, &mut vec![0.0; 11], &src, 1, &t).is_err(),
            "short output"
        );
        assert!(
            super::from_bytes(
                &Cpu,
                &mut out,
                &src,
                1,
                &ImageTransform { channels: 4, ..t }
            )
            .is_err(),
            "4 channels"
        );
        assert!(
            super::from_bytes(
                &Cpu,
                &mut out,
                &src,
                1,
                &ImageTransform { channels: 0, ..t }
            )
            .is_err(),
            "0 channels"
        );
        assert!(
            super::from_bytes(
                &Cpu,
                &mut out,
                &src,
                1,
                &ImageTransform { dst_size: 0, ..t }
            )
            .is_err(),
            "empty output"
        );
        assert!(
            super::from_bytes(
                &Cpu,
                &mut out,
                &src,
                1,
                &ImageTransform {
                    std: [1.0, 0.0, 1.0],
                    ..t
                }
            )
            .is_err(),
            "zero std"
        );
        let e = super::from_bytes(
            &Cpu,
            &mut out,
            &src,
            1,
            &ImageTransform {
                resize: Some(1),
                ..t
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("center-crop 2 pixels") && e.contains("resized to 1"),
            "{e}"
        );
    }

    #[test]
    fn center_offsets_round_half_to_even_as_torchvision() {
        // Python: int(round((size - crop) / 2)).
        for (size, crop, off) in [
            (256, 224, 16),
            (20, 15, 2),
            (23, 16, 4),
            (21, 15, 3),
            (5, 5, 0),
            (6, 5, 0),
            (8, 5, 2),
        ] {
            assert_eq!(super::center_offset(size, crop), off, "{size} -> {crop}");
        }
    }

    #[test]
    fn center_crop_of_an_upsampled_image_by_hand() {
        // Row 0 of [[0, 255], [255, 0]] resized to 4 is [0, 63.75, 191.25,
        // 255] (upsampling_matches_pytorch); rows blend with weights 0.25 /
        // 0.75, so row 1 is [63.75, 95.625, 159.375, 191.25]. The center 2x2
        // keeps rows and columns 1 and 2.
        let src = [0u8, 255, 255, 0];
        let t = ImageTransform {
            channels: 1,
            src_height: 2,
            src_width: 2,
            dst_size: 2,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            resize: Some(4),
        };
        let mut out = vec![0.0; 4];
        images_from_bytes(&mut out, &src, 1, &t);
        for (a, b) in out.iter().zip([95.625, 159.375, 159.375, 95.625]) {
            assert!((a - b).abs() < 1e-3, "{out:?}");
        }
        // Resizing to the model's own size and cropping nothing is the plain path.
        let plain = ImageTransform {
            dst_size: 4,
            resize: None,
            ..t
        };
        let (mut a, mut b) = (vec![0.0; 16], vec![0.0; 16]);
        images_from_bytes(&mut a, &src, 1, &plain);
        images_from_bytes(
            &mut b,
            &src,
            1,
            &ImageTransform {
                resize: Some(4),
                ..plain
            },
        );
        assert_eq!(a, b);
    }

    /// Against PyTorch: `F.interpolate` to the intermediate size, then
    /// torchvision's `center_crop` (scripts/make_image_reference.py).
    #[test]
    fn resize_then_center_crop_matches_pytorch() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/image_crop_reference.safetensors"
        ))
        .unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let imagenet = crate::data::Normalize::Imagenet;
        for case in ["cifar", "odd_down", "odd_up"] {
            let src = file.tensor(&format!("{case}.src")).unwrap();
            let want: Vec<f32> =
                bytemuck::pod_collect_to_vec(file.tensor(&format!("{case}.out")).unwrap().data());
            let geom: Vec<i64> =
                bytemuck::pod_collect_to_vec(file.tensor(&format!("{case}.geom")).unwrap().data());
            let [batch, channels, h, w] = src.shape().try_into().unwrap();
            let t = ImageTransform {
                channels,
                src_height: h,
                src_width: w,
                dst_size: geom[1] as usize,
                mean: imagenet.mean(),
                std: imagenet.std(),
                resize: Some(geom[0] as usize),
            };
            let mut out = vec![0.0; want.len()];
            super::from_bytes(&Cpu, &mut out, src.data(), batch, &t).unwrap();
            assert_close(case, &[out], &[want], 1e-5);
        }
    }

    fn resize_and_normalize_match_the_cpu<D: Backend>(dev: &D) {
        for (h, w, s) in [(32, 32, 24), (20, 27, 37), (16, 16, 16)] {
            let batch = 2;
            let t = ImageTransform {
                channels: 3,
                src_height: h,
                src_width: w,
                dst_size: s,
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
                resize: None,
            };
            let mut rng = Rng::new(42);
            let bytes: Vec<u8> = (0..batch * 3 * h * w)
                .map(|_| rng.below(256) as u8)
                .collect();
            let (c, g) =
                crate::on_both!(dev, vec![act(vec![0.0; batch * 3 * s * s])], |be, [out]| {
                    super::from_bytes(be, out, &bytes, batch, &t).unwrap();
                });
            assert_close(
                &format!("images {:?} {h}x{w} -> {s}", dev.precision()),
                &g,
                &c,
                tol(dev.precision(), EW),
            );
        }
    }

    crate::on_every_device!(resize_and_normalize_match_the_cpu);

    fn resize_then_center_crop_matches_the_cpu<D: Backend>(dev: &D) {
        for (h, w, r, s) in [
            (32, 32, 256, 224),
            (9, 7, 20, 15),
            (8, 8, 23, 16),
            (16, 16, 16, 16),
        ] {
            let batch = 2;
            let t = ImageTransform {
                channels: 3,
                src_height: h,
                src_width: w,
                dst_size: s,
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
                resize: Some(r),
            };
            let mut rng = Rng::new(7);
            let bytes: Vec<u8> = (0..batch * 3 * h * w)
                .map(|_| rng.below(256) as u8)
                .collect();
            let (c, g) =
                crate::on_both!(dev, vec![act(vec![0.0; batch * 3 * s * s])], |be, [out]| {
                    super::from_bytes(be, out, &bytes, batch, &t).unwrap();
                });
            assert_close(
                &format!("cropped images {:?} {h}x{w} -> {r} -> {s}", dev.precision()),
                &g,
                &c,
                tol(dev.precision(), EW),
            );
        }
    }

    crate::on_every_device!(resize_then_center_crop_matches_the_cpu);
}
