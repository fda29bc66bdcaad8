//! The CIFAR binary formats (METHOD.md, "Formats").
//!
//! CIFAR-10: records of 3073 bytes, `[label][3072 pixel bytes]`, in
//! `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`.
//! CIFAR-100: records of 3074 bytes, `[coarse label][fine label][3072 pixel
//! bytes]`, in `train.bin` (50,000 records) and `test.bin` (10,000); the
//! engine uses the fine labels (100 classes). The pixel bytes are the R plane,
//! then G, then B, each 32x32 row-major: already the `[c, h, w]` layout of a
//! [`Dataset`], so they are copied as they are.

use super::Dataset;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Side of a CIFAR image.
pub const SIDE: usize = 32;
/// Pixel bytes per CIFAR image (3 planes of 32x32).
pub const PIXELS: usize = 3 * SIDE * SIDE;

/// Which of the two CIFAR variants a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

impl CifarKind {
    /// Label bytes before the pixels of each record.
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    /// Bytes per record: 3073 or 3074.
    pub fn record_len(self) -> usize {
        self.label_bytes() + PIXELS
    }

    pub fn classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "CIFAR-10",
            CifarKind::Cifar100 => "CIFAR-100",
        }
    }

    /// The file beside the data that names the classes, one per line.
    fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
        }
    }
}

/// Read one or more CIFAR binary files of one kind into one data set, in the
/// order given. Class names come from `batches.meta.txt` /
/// `fine_label_names.txt` beside the first file when it is there.
pub fn load_files(kind: CifarKind, files: &[PathBuf]) -> Result<Dataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading {} file {}", kind.name(), path.display()))?;
        parse_records(kind, path, &bytes, &mut images, &mut labels)?;
    }
    let names = files
        .first()
        .and_then(|f| f.parent())
        .and_then(|dir| read_class_names(kind, dir));
    Dataset::new(images, labels, kind.classes(), names, (3, SIDE, SIDE))
}

/// Append the records of one file's bytes to `images` and `labels`.
/// `path` is only for the messages.
pub fn parse_records(
    kind: CifarKind,
    path: &Path,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let rec = kind.record_len();
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        bail!(
            "{}: {} bytes is not a whole, non-zero number of {}-byte {} records",
            path.display(),
            bytes.len(),
            rec,
            kind.name()
        );
    }
    images.reserve(bytes.len() / rec * PIXELS);
    for (i, record) in bytes.chunks_exact(rec).enumerate() {
        let label = record[kind.label_bytes() - 1] as usize;
        if label >= kind.classes() {
            bail!(
                "{}: record {i} has label {label}, but {} has {} classes",
                path.display(),
                kind.name(),
                kind.classes()
            );
        }
        labels.push(label as u32);
        images.extend_from_slice(&record[kind.label_bytes()..]);
    }
    Ok(())
}

/// The class names file in `dir`, if it is there and names exactly the
/// classes of `kind`.
fn read_class_names(kind: CifarKind, dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join(kind.names_file())).ok()?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (names.len() == kind.classes()).then_some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_record_layouts() {
        let mut rec10 = vec![7u8];
        rec10.extend((0..PIXELS).map(|i| (i % 251) as u8));
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        parse_records(
            CifarKind::Cifar10,
            Path::new("a.bin"),
            &rec10,
            &mut images,
            &mut labels,
        )
        .unwrap();
        assert_eq!(labels, vec![7]);
        assert_eq!(images, rec10[1..]);

        let mut rec100 = vec![3u8, 99];
        rec100.extend(std::iter::repeat_n(5u8, PIXELS));
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        parse_records(
            CifarKind::Cifar100,
            Path::new("b.bin"),
            &rec100,
            &mut images,
            &mut labels,
        )
        .unwrap();
        assert_eq!(labels, vec![99]);
        assert_eq!(images, vec![5u8; PIXELS]);
    }

    #[test]
    fn label_out_of_range_names_file_and_record() {
        let mut bytes = vec![0u8; 2 * CifarKind::Cifar10.record_len()];
        bytes[CifarKind::Cifar10.record_len()] = 10;
        let err = parse_records(
            CifarKind::Cifar10,
            Path::new("x.bin"),
            &bytes,
            &mut Vec::new(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.bin: record 1 has label 10, but CIFAR-10 has 10 classes"
        );
    }
}
