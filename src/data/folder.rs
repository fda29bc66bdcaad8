//! Image folders: a split folder holds one sub-folder per class, images (PNG,
//! JPEG) inside. Class names, sorted, give the label ids; the test split uses
//! the training split's mapping, so a test class missing from training is an
//! error. Every image is decoded (in parallel, with rayon), converted to RGB
//! and resized (bilinear) to one stored square size; a split that is to be
//! streamed (`stream::Streamed`) keeps its file list instead, after one
//! pass that decodes every image to check it and to fingerprint the split.

use super::stream::{self, decode_in_order, EncodedImages, ImageFiles, Streamed};
use super::Dataset;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File extensions read as images (compared case-insensitively); other files
/// in a class folder are ignored.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// One split read from a folder, with the images that were skipped.
#[derive(Debug)]
pub struct FolderSplit {
    pub data: Dataset,
    /// Images that could not be read (only with `skip_bad`), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The sorted class sub-folder names of `dir` (hidden entries ignored).
pub fn class_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("listing image folder {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("listing image folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    if names.is_empty() {
        bail!("image folder {} has no class sub-folders", dir.display());
    }
    names.sort();
    Ok(names)
}

/// How a split's images are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitOptions {
    /// Side of the stored (or, streamed, decoded) square images.
    pub size: usize,
    /// Leave unreadable images out (listed in `skipped`) instead of failing.
    pub skip_bad: bool,
    /// Stream the split with this many bytes for batches in flight (None:
    /// decode it whole into memory).
    pub stream_budget: Option<u64>,
    /// The training split (an empty class folder is an error there).
    pub is_training_split: bool,
}

/// Read the split in `dir` with label ids from `classes` (sorted names), each
/// image resized to `size` x `size` RGB. An unreadable image is an error
/// naming it, or with `skip_bad` is left out and listed in `skipped`.
pub fn load_split(dir: &Path, classes: &[String], opts: SplitOptions) -> Result<FolderSplit> {
    if opts.size == 0 {
        bail!("image size for {} must be at least 1 pixel", dir.display());
    }
    let files = list_images(dir, classes, opts.is_training_split)?;
    let (paths, labels): (Vec<PathBuf>, Vec<u32>) = files.into_iter().unzip();
    let source = ImageFiles { paths };
    match opts.stream_budget {
        None => load_decoded(dir, classes, source, labels, opts),
        Some(budget) => load_streamed(dir, classes, source, labels, opts, budget),
    }
}

fn load_decoded(
    dir: &Path,
    classes: &[String],
    source: ImageFiles,
    all_labels: Vec<u32>,
    opts: SplitOptions,
) -> Result<FolderSplit> {
    let n = 3 * opts.size * opts.size;
    let mut images = vec![0u8; source.len() * n];
    let results: Vec<Result<()>> = images
        .par_chunks_mut(n)
        .enumerate()
        .map(|(i, out)| {
            let bytes = source.encoded(i)?;
            stream::decode_into(&bytes, &source.name(i), opts.size, out)
        })
        .collect();
    let mut labels = Vec::with_capacity(all_labels.len());
    let mut skipped = Vec::new();
    for (i, (label, result)) in all_labels.into_iter().zip(results).enumerate() {
        match result {
            Ok(()) => {
                images.copy_within(i * n..(i + 1) * n, labels.len() * n);
                labels.push(label);
            }
            Err(e) => skipped.push(skip_or_fail(&source, i, &e, opts.skip_bad)?),
        }
    }
    images.truncate(labels.len() * n);
    if labels.is_empty() {
        bail!("image folder {} has no readable images", dir.display());
    }
    let data = Dataset::new(
        images,
        labels,
        classes.len(),
        Some(classes.to_vec()),
        (3, opts.size, opts.size),
    )?;
    Ok(FolderSplit { data, skipped })
}

/// The split as a streamed data set: one pass decodes every image (a
/// budget's worth at a time) to find unreadable ones and to fingerprint the
/// split as its decoded copy would be; a second pass only when images were
/// left out (the fingerprint hashes the labels before the pixels).
fn load_streamed(
    dir: &Path,
    classes: &[String],
    source: ImageFiles,
    all_labels: Vec<u32>,
    opts: SplitOptions,
    budget: u64,
) -> Result<FolderSplit> {
    let source: Arc<dyn EncodedImages> = Arc::new(source);
    let chunk = stream::pass_chunk(budget, 3 * opts.size * opts.size);
    let mut streamed = Streamed {
        source: source.clone(),
        items: (0..source.len()).collect(),
        side: opts.size,
        budget,
        fingerprint: String::new(),
    };
    let whole = Dataset::streamed(
        streamed.clone(),
        all_labels.clone(),
        classes.len(),
        Some(classes.to_vec()),
    )?;
    let mut good = Vec::with_capacity(source.len());
    let mut skipped = Vec::new();
    let fingerprint = whole.fingerprint_with(|feed| {
        decode_in_order(
            source.as_ref(),
            &streamed.items,
            opts.size,
            chunk,
            |i, image| {
                match image {
                    Ok(pixels) => {
                        feed(pixels);
                        good.push(i);
                    }
                    Err(e) => skipped.push(skip_or_fail(source.as_ref(), i, &e, opts.skip_bad)?),
                }
                Ok(())
            },
        )
    })?;
    if good.is_empty() {
        bail!("image folder {} has no readable images", dir.display());
    }
    let labels: Vec<u32> = good.iter().map(|&i| all_labels[i]).collect();
    streamed.items = good;
    streamed.fingerprint = fingerprint;
    let mut data = Dataset::streamed(streamed, labels, classes.len(), Some(classes.to_vec()))?;
    if !skipped.is_empty() {
        let fingerprint = stream::fingerprint_streamed(&data)?;
        if let Some(s) = data.stream.as_mut() {
            s.fingerprint = fingerprint;
        }
    }
    Ok(FolderSplit { data, skipped })
}

/// An unreadable image `i`: with `skip_bad` its path and the reason, else
/// the error naming it.
fn skip_or_fail(
    source: &dyn EncodedImages,
    i: usize,
    e: &anyhow::Error,
    skip_bad: bool,
) -> Result<(PathBuf, String)> {
    if !skip_bad {
        bail!(
            "{} (the skip-bad option leaves unreadable images out)",
            describe(e)
        );
    }
    Ok((PathBuf::from(source.name(i)), describe(e)))
}

/// Number of images in the split in `dir` (listing only, nothing decoded).
pub fn count_images(dir: &Path, classes: &[String], is_training_split: bool) -> Result<usize> {
    Ok(list_images(dir, classes, is_training_split)?.len())
}

/// An image error in one line: our context and the decoder's message (whose
/// own sources repeat it, so they are left out).
fn describe(e: &anyhow::Error) -> String {
    match e.chain().nth(1) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Every image file of the class sub-folders of `dir`, with its label, in
/// (class, file name) order. A sub-folder not in `classes` is an error, and
/// so is an empty class folder in the training split (its class could
/// never be learned); the test split may lack images of a class.
fn list_images(
    dir: &Path,
    classes: &[String],
    is_training_split: bool,
) -> Result<Vec<(PathBuf, u32)>> {
    let mut files = Vec::new();
    for name in class_names(dir)? {
        let Some(label) = classes.iter().position(|c| *c == name) else {
            bail!(
                "class folder '{name}' in {} is not among the training classes ({} classes from the training split)",
                dir.display(),
                classes.len()
            );
        };
        let class_dir = dir.join(&name);
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(&class_dir)
            .with_context(|| format!("listing {}", class_dir.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", class_dir.display()))?
                .path();
            if path.is_file() && has_image_extension(&path) {
                paths.push(path);
            }
        }
        paths.sort();
        if paths.is_empty() && is_training_split {
            bail!(
                "class folder '{name}' in {} has no images ({}); remove it or add its images",
                dir.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        files.extend(paths.into_iter().map(|p| (p, label as u32)));
    }
    if files.is_empty() {
        bail!(
            "image folder {} has no images ({}) in its class sub-folders",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    Ok(files)
}

fn has_image_extension(path: &Path) -> bool {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    ext.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::stream::interleaved_to_planes;

    #[test]
    fn interleaved_to_planes_splits_channels() {
        let px = [1u8, 2, 3, 4, 5, 6];
        let mut planes = [0u8; 6];
        interleaved_to_planes(&px, 3, &mut planes);
        assert_eq!(planes, [1, 4, 2, 5, 3, 6]);
    }

    #[test]
    fn only_image_extensions_count() {
        assert!(has_image_extension(Path::new("a/b.PNG")));
        assert!(has_image_extension(Path::new("a/b.jpeg")));
        assert!(!has_image_extension(Path::new("a/README.txt")));
        assert!(!has_image_extension(Path::new("a/noext")));
    }
}
