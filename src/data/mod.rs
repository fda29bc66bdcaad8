//! The data layer: every image the engine sees comes through here as raw
//! bytes, laid out `[n, channels, height, width]` (one plane per channel, as in
//! the CIFAR binary files), with one `u32` label per image.
//!
//! - `source`: `load_data(spec, opts)` turns `demo`, a CIFAR folder or an
//!   image-folder root into a (train, test) pair of [`Dataset`]s;
//! - `cifar`: the CIFAR-10 and CIFAR-100 binary formats;
//! - `folder`: image folders (one sub-folder per class, PNG/JPEG), decoded in
//!   parallel and resized to one stored size;
//! - `stream`: data larger than the memory budget, kept encoded and decoded
//!   per batch by threads working ahead of the trainer (`for_each_batch`);
//! - `demo`: the built-in synthetic data set, generated from a seed;
//! - `augment`: seeded shuffling, random flip and padded random crop, and
//!   batch assembly, all pure functions of (seed, epoch, index);
//! - `normalize`: the mean/std presets (`--normalize cifar|imagenet|half|clip`).
//!
//! Images stay `u8` on the host: the resize to the model's resolution and the
//! normalization happen on the device (`ops::image::from_bytes`), so the
//! host only moves a quarter of the bytes that `f32` would need.

pub mod augment;
pub mod cifar;
pub mod cifar_pickle;
pub mod demo;
pub mod folder;
pub mod hf_parquet;
pub mod normalize;
pub mod source;
pub mod stream;

pub use augment::{augmented_batch, epoch_order, Augment};
pub use demo::DemoConfig;
pub use normalize::Normalize;
pub use source::{load_data, DataSource, LoadOptions, Loaded};
pub use stream::{for_each_batch, BatchPass, EncodedImages, Streamed};

use anyhow::{bail, Result};

/// A labelled set of images, stored as raw bytes, or streamed: kept encoded
/// and decoded when a batch needs them (`stream`).
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Pixels `[n, channels, height, width]`, row-major, one plane per
    /// channel; empty when the data set is streamed.
    pub images: Vec<u8>,
    /// Where a streamed data set's images are decoded from (None: every
    /// image is in `images`). Read images through `augmented_batch` or
    /// `for_each_batch`, which handle both.
    pub stream: Option<Streamed>,
    /// One label per image, each below `classes`.
    pub labels: Vec<u32>,
    /// Number of classes (the model's head size).
    pub classes: usize,
    /// Class names by label id, when the source names them.
    pub class_names: Option<Vec<String>>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Dataset {
    /// A data set after checking that the pieces agree: `images` holds exactly
    /// `labels.len()` images of `channels x height x width`, every label is
    /// below `classes`, and `class_names` (if any) has `classes` entries.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u32>,
        classes: usize,
        class_names: Option<Vec<String>>,
        (channels, height, width): (usize, usize, usize),
    ) -> Result<Self> {
        let ds = Dataset {
            images,
            stream: None,
            labels,
            classes,
            class_names,
            channels,
            height,
            width,
        };
        ds.validate()?;
        Ok(ds)
    }

    /// A streamed data set: image `i` is `stream`'s item `i`, of `3 x side x
    /// side` once decoded, with label `labels[i]`.
    pub fn streamed(
        stream: Streamed,
        labels: Vec<u32>,
        classes: usize,
        class_names: Option<Vec<String>>,
    ) -> Result<Self> {
        let side = stream.side;
        let ds = Dataset {
            images: Vec::new(),
            stream: Some(stream),
            labels,
            classes,
            class_names,
            channels: 3,
            height: side,
            width: side,
        };
        ds.validate()?;
        Ok(ds)
    }

    /// Check the invariants listed on [`Dataset::new`] (for a streamed set:
    /// one item per label and no decoded bytes).
    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            bail!(
                "data set image shape {}x{}x{} has a zero dimension",
                self.channels,
                self.height,
                self.width
            );
        }
        if self.classes == 0 {
            bail!("data set has 0 classes");
        }
        let expected = match &self.stream {
            None => self.labels.len() * self.image_len(),
            Some(s) => {
                if s.items.len() != self.labels.len() {
                    bail!(
                        "streamed data set has {} images for {} labels",
                        s.items.len(),
                        self.labels.len()
                    );
                }
                if let Some(&i) = s.items.iter().find(|&&i| i >= s.source.len()) {
                    bail!(
                        "streamed data set names image {i} of a source of {}",
                        s.source.len()
                    );
                }
                0
            }
        };
        if self.images.len() != expected {
            bail!(
                "data set holds {} image bytes, expected {} ({} labels x {}x{}x{})",
                self.images.len(),
                expected,
                self.labels.len(),
                self.channels,
                self.height,
                self.width
            );
        }
        if let Some(i) = self.labels.iter().position(|&l| l as usize >= self.classes) {
            bail!(
                "data set label {} at index {i} is not below the class count {}",
                self.labels[i],
                self.classes
            );
        }
        if let Some(names) = &self.class_names {
            if names.len() != self.classes {
                bail!(
                    "data set has {} class names for {} classes",
                    names.len(),
                    self.classes
                );
            }
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Bytes this data set holds in memory: its decoded images, or, when
    /// streamed, what its source keeps (a parquet split's encoded images;
    /// nothing for files on disk).
    pub fn held_bytes(&self) -> u64 {
        self.images.len() as u64 + self.stream.as_ref().map_or(0, |s| s.source.held_bytes())
    }

    /// Whether the images are decoded per batch instead of held.
    pub fn is_streamed(&self) -> bool {
        self.stream.is_some()
    }

    /// Bytes of every image decoded: `len() * image_len()`.
    pub fn decoded_bytes(&self) -> u64 {
        self.len() as u64 * self.image_len() as u64
    }

    /// The bytes of image `i`, `[channels, height, width]`, of a data set
    /// held in memory (a streamed one holds none: `augmented_batch` and
    /// `for_each_batch` read both kinds).
    ///
    /// # Panics
    /// When `i` is out of range or the data set is streamed.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// A content hash of the data set (shape, labels and every pixel):
    /// the first 16 bytes of a SHA-256, as hex. Two data sets with the same
    /// fingerprint hold the same images in the same order. A streamed data
    /// set has the fingerprint its decoded copy would have (computed when
    /// it was loaded).
    pub fn fingerprint(&self) -> String {
        match &self.stream {
            Some(s) => s.fingerprint.clone(),
            None => self
                .fingerprint_with(|feed| {
                    feed(&self.images);
                    Ok(())
                })
                .expect("hashing bytes in memory cannot fail"),
        }
    }

    /// The fingerprint of this data set's shape and labels with the pixels
    /// that `feed` hands to its callback, every image in order.
    pub(crate) fn fingerprint_with(
        &self,
        feed: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<()>,
    ) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for v in [
            self.channels,
            self.height,
            self.width,
            self.classes,
            self.len(),
        ] {
            h.update((v as u64).to_le_bytes());
        }
        for l in &self.labels {
            h.update(l.to_le_bytes());
        }
        feed(&mut |bytes| h.update(bytes))?;
        Ok(h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// How many images each class has, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// The images at `indices`, in that order (e.g. a quick subset for a CPU
    /// run). An index past the end is an error.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        check_indices(self, indices)?;
        if let Some(s) = &self.stream {
            let mut sub = s.clone();
            sub.items = indices.iter().map(|&i| s.items[i]).collect();
            let labels = indices.iter().map(|&i| self.labels[i]).collect();
            let mut ds = Dataset::streamed(sub, labels, self.classes, self.class_names.clone())?;
            let fingerprint = stream::fingerprint_streamed(&ds)?;
            if let Some(s) = ds.stream.as_mut() {
                s.fingerprint = fingerprint;
            }
            return Ok(ds);
        }
        let mut images = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        let labels = indices.iter().map(|&i| self.labels[i]).collect();
        Ok(Dataset {
            images,
            stream: None,
            labels,
            classes: self.classes,
            class_names: self.class_names.clone(),
            channels: self.channels,
            height: self.height,
            width: self.width,
        })
    }
}

/// Error if any index is not below `ds.len()`.
pub(crate) fn check_indices(ds: &Dataset, indices: &[usize]) -> Result<()> {
    if let Some(&i) = indices.iter().find(|&&i| i >= ds.len()) {
        bail!(
            "image index {i} is out of range for a data set of {} images",
            ds.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let images: Vec<u8> = (0..3 * 2 * 2 * 2).map(|v| v as u8).collect();
        Dataset::new(images, vec![0, 1, 1], 2, None, (2, 2, 2)).unwrap()
    }

    #[test]
    fn new_rejects_inconsistent_pieces() {
        let err = Dataset::new(vec![0; 7], vec![0], 2, None, (2, 2, 2)).unwrap_err();
        assert!(
            err.to_string().contains("holds 7 image bytes, expected 8"),
            "{err}"
        );
        let err = Dataset::new(vec![0; 8], vec![2], 2, None, (2, 2, 2)).unwrap_err();
        assert!(err.to_string().contains("label 2 at index 0"), "{err}");
        let err =
            Dataset::new(vec![0; 8], vec![0], 2, Some(vec!["a".into()]), (2, 2, 2)).unwrap_err();
        assert!(
            err.to_string().contains("1 class names for 2 classes"),
            "{err}"
        );
    }

    #[test]
    fn fingerprints_see_every_pixel_and_label() {
        let ds = tiny();
        assert_eq!(ds.fingerprint(), tiny().fingerprint());
        assert_eq!(ds.fingerprint().len(), 32);
        let mut pixel = tiny();
        pixel.images[5] ^= 1;
        let mut label = tiny();
        label.labels[0] = 1;
        let reordered = ds.subset(&[1, 0, 2]).unwrap();
        for other in [pixel, label, reordered] {
            assert_ne!(other.fingerprint(), ds.fingerprint());
        }
    }

    #[test]
    fn subset_and_counts() {
        let ds = tiny();
        assert_eq!(ds.class_counts(), vec![1, 2]);
        let sub = ds.subset(&[2, 0]).unwrap();
        assert_eq!(sub.labels, vec![1, 0]);
        assert_eq!(sub.image(0), ds.image(2));
        assert_eq!(sub.image(1), ds.image(0));
        sub.validate().unwrap();
        assert!(ds
            .subset(&[3])
            .unwrap_err()
            .to_string()
            .contains("index 3 is out of range"));
    }
}
