//! Raw bytes to normalized model input on the CPU: bilinear resize with
//! PyTorch's `align_corners=False` sampling (to the intermediate size and a
//! center crop when the transform asks for one), then per-channel
//! normalization.

use super::{ImageKernel, ImageTransform};
use crate::device::Cpu;
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

/// For each output index, the two source indices and the weight of the
/// second: source coordinate `(o + 0.5) · in/out − 0.5`, clamped at 0.
pub fn bilinear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            (i0, i1, src - i0 as f32)
        })
        .collect()
}

pub fn images_from_bytes(out: &mut [f32], src: &[u8], batch: usize, t: &ImageTransform) {
    let (c, h, w, s) = (t.channels, t.src_height, t.src_width, t.dst_size);
    assert!(
        src.len() >= batch * c * h * w,
        "images_from_bytes: {} bytes for {batch} images of {c}x{h}x{w}",
        src.len()
    );
    // A center crop of the resized image is the crop's window of its taps.
    let (size, off) = t.resized();
    let ys = &bilinear_taps(h, size)[off..off + s];
    let xs = &bilinear_taps(w, size)[off..off + s];
    out[..batch * c * s * s]
        .par_chunks_mut(s * s)
        .enumerate()
        .for_each(|(plane, o)| {
            let ch = plane % c;
            let img = &src[plane * h * w..(plane + 1) * h * w];
            let (mean, inv_std) = (t.mean[ch], 1.0 / t.std[ch]);
            for (oy, &(y0, y1, ly)) in ys.iter().enumerate() {
                for (ox, &(x0, x1, lx)) in xs.iter().enumerate() {
                    let p = |y: usize, x: usize| img[y * w + x] as f32;
                    let v = (1.0 - ly) * ((1.0 - lx) * p(y0, x0) + lx * p(y0, x1))
                        + ly * ((1.0 - lx) * p(y1, x0) + lx * p(y1, x1));
                    o[oy * s + ox] = (v / 255.0 - mean) * inv_std;
                }
            }
        });
}

impl ImageKernel for Cpu {
    fn images_from_bytes(
        &self,
        out: &mut Vec<f32>,
        src: &[u8],
        batch: usize,
        t: &ImageTransform,
        _: Checked,
    ) -> Result<()> {
        images_from_bytes(out, src, batch, t);
        Ok(())
    }
}
