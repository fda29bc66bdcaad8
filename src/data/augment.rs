//! Epoch order, augmentation and batch assembly on raw `u8` images.
//!
//! Every random choice is a pure function of named keys, so a run repeats
//! exactly and a resumed run continues where it stopped:
//! - the order of an epoch is `Rng::from_keys(&[seed, epoch])`'s permutation;
//! - the augmentation of image `index` in an epoch comes from
//!   `Rng::from_keys(&[seed, epoch, index])`, whatever batch it lands in.
//!
//! The augmentation is the reference experiment's: a random crop of the stored
//! size from the image zero-padded by `pad` pixels on every side (offsets
//! uniform in `0..=2*pad`), then a horizontal flip with probability 1/2. Both
//! are a single index mapping from output to input pixel, done in one pass.

use super::{check_indices, Dataset};
use crate::rng::Rng;
use anyhow::Result;
use rayon::prelude::*;

/// Which augmentations to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Flip horizontally with probability 1/2.
    pub flip: bool,
    /// Zero padding on each side before the random crop; 0 for no crop.
    pub pad: usize,
}

impl Augment {
    /// No augmentation: batches are plain copies (evaluation).
    pub const NONE: Augment = Augment {
        flip: false,
        pad: 0,
    };
    /// The reference training augmentation: flip, 4-pixel padded crop.
    pub const STANDARD: Augment = Augment { flip: true, pad: 4 };

    pub fn is_none(&self) -> bool {
        !self.flip && self.pad == 0
    }
}

/// The drawn augmentation of one image: crop offsets into the padded image
/// (each in `0..=2*pad`) and whether to flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AugmentDraw {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
}

impl AugmentDraw {
    /// The draw for image `index` of epoch `epoch`.
    pub fn new(aug: &Augment, seed: u64, epoch: u64, index: usize) -> Self {
        let mut rng = Rng::from_keys(&[seed, epoch, index as u64]);
        let dy = if aug.pad > 0 {
            rng.below(2 * aug.pad + 1)
        } else {
            0
        };
        let dx = if aug.pad > 0 {
            rng.below(2 * aug.pad + 1)
        } else {
            0
        };
        let flip = aug.flip && rng.next_u64() >> 63 == 1;
        AugmentDraw { dy, dx, flip }
    }
}

/// The visiting order of epoch `epoch`: a permutation of `0..n`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    Rng::from_keys(&[seed, epoch]).permutation(n)
}

/// Write the images at `indices`, augmented, to `images` (`[b, c, h, w]`,
/// replacing its contents) and their labels to `labels`. An index past the
/// end of `ds` is an error.
pub fn augmented_batch(
    ds: &Dataset,
    indices: &[usize],
    aug: &Augment,
    seed: u64,
    epoch: u64,
    images: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    check_indices(ds, indices)?;
    let n = ds.image_len();
    images.clear();
    images.resize(indices.len() * n, 0);
    let shape = (ds.channels, ds.height, ds.width);
    match &ds.stream {
        None => images
            .par_chunks_mut(n)
            .zip(indices.par_iter())
            .for_each(|(out, &i)| {
                if aug.is_none() {
                    out.copy_from_slice(ds.image(i));
                } else {
                    let draw = AugmentDraw::new(aug, seed, epoch, i);
                    apply(ds.image(i), shape, aug.pad, draw, out);
                }
            }),
        // Decoded per image; the same bytes as the in-memory copy.
        Some(stream) => images
            .par_chunks_mut(n)
            .zip(indices.par_iter())
            .try_for_each(|(out, &i)| -> Result<()> {
                if aug.is_none() {
                    stream.decode(i, out)
                } else {
                    let mut decoded = vec![0u8; n];
                    stream.decode(i, &mut decoded)?;
                    let draw = AugmentDraw::new(aug, seed, epoch, i);
                    apply(&decoded, shape, aug.pad, draw, out);
                    Ok(())
                }
            })?,
    }
    labels.clear();
    labels.extend(indices.iter().map(|&i| ds.labels[i]));
    Ok(())
}

/// Crop-and-flip one `[c, h, w]` image: output pixel (y, x) is the padded
/// image's pixel (y + dy, x' + dx) with x' = w-1-x when flipping, else x;
/// pixels of the padding are 0.
pub fn apply(
    src: &[u8],
    (c, h, w): (usize, usize, usize),
    pad: usize,
    d: AugmentDraw,
    out: &mut [u8],
) {
    for ch in 0..c {
        let (plane, out_plane) = (
            &src[ch * h * w..(ch + 1) * h * w],
            &mut out[ch * h * w..(ch + 1) * h * w],
        );
        for y in 0..h {
            let sy = (y + d.dy).checked_sub(pad).filter(|&sy| sy < h);
            for x in 0..w {
                let xf = if d.flip { w - 1 - x } else { x };
                let sx = (xf + d.dx).checked_sub(pad).filter(|&sx| sx < w);
                out_plane[y * w + x] = match (sy, sx) {
                    (Some(sy), Some(sx)) => plane[sy * w + sx],
                    _ => 0,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 1, 0);
        assert_eq!(a, epoch_order(100, 1, 0));
        assert_ne!(a, epoch_order(100, 1, 1));
        assert_ne!(a, epoch_order(100, 2, 0));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn draws_stay_in_range_and_use_every_offset() {
        let aug = Augment::STANDARD;
        let draws: Vec<AugmentDraw> = (0..2000).map(|i| AugmentDraw::new(&aug, 3, 1, i)).collect();
        assert!(draws.iter().all(|d| d.dy <= 8 && d.dx <= 8));
        for off in 0..=8 {
            assert!(
                draws.iter().any(|d| d.dy == off) && draws.iter().any(|d| d.dx == off),
                "offset {off} never drawn"
            );
        }
        let flips = draws.iter().filter(|d| d.flip).count();
        assert!((900..1100).contains(&flips), "{flips} flips of 2000");
        let none = AugmentDraw::new(&Augment::NONE, 3, 1, 0);
        assert_eq!(
            none,
            AugmentDraw {
                dy: 0,
                dx: 0,
                flip: false
            }
        );
    }
}
