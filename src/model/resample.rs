//! Resampling a position embedding to another patch grid, as timm's
//! `resample_abs_pos_embed` does: the prefix tokens (the class token) are
//! kept, the patch tokens are seen as a `[width, grid, grid]` image and
//! resized with PyTorch's `F.interpolate(mode="bicubic",
//! align_corners=False, antialias=...)`, computed here on the host.
//!
//! PyTorch has two bicubic resizers, and they differ:
//! - `antialias=False` (`upsample_bicubic2d`): Keys' cubic with a = -0.75,
//!   four taps around `scale * (i + 0.5) - 0.5`, indices clamped to the
//!   border.
//! - `antialias=True` (`_upsample_bicubic2d_aa`, Pillow's filter): the cubic
//!   with a = -0.5, its support widened by the scale when shrinking, taps
//!   cut at the border and the weights of each output renormalized to sum
//!   to one. timm passes `antialias=True` (its default), so imports use it.

use anyhow::{bail, Result};

/// A square grid resized from `from` x `from` to `to` x `to` cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridResize {
    pub from: usize,
    pub to: usize,
}

/// The taps of one output index: the first input index and its weights.
struct Taps {
    start: usize,
    weights: Vec<f64>,
}

/// Keys' cubic convolution kernel with parameter `a`.
fn cubic(x: f64, a: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// `upsample_bicubic2d` (align_corners=False) along one axis: four taps
/// around the source coordinate, indices clamped, as one weight per input
/// index so that clamped taps add up.
fn taps_clamped(n_in: usize, n_out: usize) -> Vec<Taps> {
    const A: f64 = -0.75;
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let src = scale * (i as f64 + 0.5) - 0.5;
            let floor = src.floor();
            let t = src - floor;
            let coeffs = [
                cubic(t + 1.0, A),
                cubic(t, A),
                cubic(1.0 - t, A),
                cubic(2.0 - t, A),
            ];
            let mut weights = vec![0.0; n_in];
            for (k, c) in coeffs.iter().enumerate() {
                let j = (floor as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
                weights[j] += c;
            }
            Taps { start: 0, weights }
        })
        .collect()
}

/// `_upsample_bicubic2d_aa` along one axis: Pillow's bicubic (a = -0.5),
/// support scaled when shrinking, cut at the borders, renormalized.
fn taps_antialiased(n_in: usize, n_out: usize) -> Vec<Taps> {
    const A: f64 = -0.5;
    let scale = n_in as f64 / n_out as f64;
    let (support, inv_scale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    (0..n_out)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            // PyTorch truncates toward zero (an int64 cast), then clamps.
            let lo = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let hi = ((center + support + 0.5).trunc() as i64).min(n_in as i64) as usize;
            let mut weights: Vec<f64> = (lo..hi)
                .map(|j| cubic((j as f64 - center + 0.5) * inv_scale, A))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps { start: lo, weights }
        })
        .collect()
}

/// Resize an image stored channels-last, `[grid.from, grid.from, channels]`,
/// to `[grid.to, grid.to, channels]` with PyTorch's bicubic.
pub fn bicubic_resize_hwc(
    src: &[f32],
    channels: usize,
    grid: GridResize,
    antialias: bool,
) -> Result<Vec<f32>> {
    let GridResize { from, to } = grid;
    if from == 0 || to == 0 {
        bail!("bicubic resize from {from} x {from} to {to} x {to}: both sides must be positive");
    }
    if src.len() != from * from * channels {
        bail!(
            "bicubic resize: {} values are not a {from} x {from} grid of {channels} channels",
            src.len()
        );
    }
    let taps = if antialias {
        taps_antialiased(from, to)
    } else {
        taps_clamped(from, to)
    };
    // Columns first (rows of the input, resized along x), then rows, in f64.
    let mut across = vec![0f64; from * to * channels];
    for y in 0..from {
        for (x, tap) in taps.iter().enumerate() {
            let out = &mut across[(y * to + x) * channels..][..channels];
            for (k, w) in tap.weights.iter().enumerate() {
                let row = &src[(y * from + tap.start + k) * channels..][..channels];
                for (o, v) in out.iter_mut().zip(row) {
                    *o += w * *v as f64;
                }
            }
        }
    }
    let mut out = vec![0f32; to * to * channels];
    for (y, tap) in taps.iter().enumerate() {
        for x in 0..to {
            let mut acc = vec![0f64; channels];
            for (k, w) in tap.weights.iter().enumerate() {
                let row = &across[((tap.start + k) * to + x) * channels..][..channels];
                for (o, v) in acc.iter_mut().zip(row) {
                    *o += w * v;
                }
            }
            for (o, v) in out[(y * to + x) * channels..][..channels]
                .iter_mut()
                .zip(&acc)
            {
                *o = *v as f32;
            }
        }
    }
    Ok(out)
}

/// A position embedding `[prefix + from², width]` resampled to
/// `[prefix + to², width]`: the first `prefix` rows kept, the patch rows
/// resized as timm's `resample_abs_pos_embed` does (`antialias`: timm's
/// default is true).
pub fn resample_pos_embed(
    pos: &[f32],
    width: usize,
    prefix: usize,
    grid: GridResize,
    antialias: bool,
) -> Result<Vec<f32>> {
    let expected = (prefix + grid.from * grid.from) * width;
    if pos.len() != expected {
        bail!(
            "position embedding of {} values is not {prefix} prefix tokens and a {g} x {g} grid of width {width}",
            pos.len(),
            g = grid.from
        );
    }
    let mut out = pos[..prefix * width].to_vec();
    out.extend(bicubic_resize_hwc(
        &pos[prefix * width..],
        width,
        grid,
        antialias,
    )?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_size_is_the_identity_and_weights_sum_to_one() {
        let src: Vec<f32> = (0..4 * 4 * 2).map(|i| (i as f32 * 0.37).sin()).collect();
        for antialias in [false, true] {
            let same =
                bicubic_resize_hwc(&src, 2, GridResize { from: 4, to: 4 }, antialias).unwrap();
            for (a, b) in same.iter().zip(&src) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b} (antialias {antialias})");
            }
            // A constant image stays constant at any size (weights sum to one).
            for to in [1, 3, 7, 9] {
                let flat = vec![0.5f32; 16];
                let out =
                    bicubic_resize_hwc(&flat, 1, GridResize { from: 4, to }, antialias).unwrap();
                assert!(out.iter().all(|v| (v - 0.5).abs() < 1e-6), "{out:?}");
            }
        }
    }

    #[test]
    fn prefix_tokens_are_kept_and_bad_lengths_named() {
        let pos: Vec<f32> = (0..(1 + 9) * 3).map(|i| i as f32).collect();
        let out = resample_pos_embed(&pos, 3, 1, GridResize { from: 3, to: 5 }, true).unwrap();
        assert_eq!(out.len(), (1 + 25) * 3);
        assert_eq!(&out[..3], &pos[..3]);
        let e = resample_pos_embed(&pos[1..], 3, 1, GridResize { from: 3, to: 5 }, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 x 3 grid of width 3"), "{e}");
    }
}
