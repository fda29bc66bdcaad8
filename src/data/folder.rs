//! Image folders: a split folder holds one sub-folder per class, images (PNG,
//! JPEG) inside. Class names, sorted, give the label ids; the test split uses
//! the training split's mapping, so a test class missing from training is an
//! error. Every image is decoded (in parallel, with rayon), converted to RGB
//! and resized (bilinear) to one stored square size.

use super::Dataset;
use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

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

/// Read the split in `dir` with label ids from `classes` (sorted names), each
/// image resized to `size` x `size` RGB. An unreadable image is an error
/// naming it, or with `skip_bad` is left out and listed in `skipped`.
pub fn load_split(
    dir: &Path,
    classes: &[String],
    size: usize,
    skip_bad: bool,
    is_training_split: bool,
) -> Result<FolderSplit> {
    if size == 0 {
        bail!("image size for {} must be at least 1 pixel", dir.display());
    }
    let files = list_images(dir, classes, is_training_split)?;
    let n = 3 * size * size;
    let mut images = vec![0u8; files.len() * n];
    let results: Vec<Result<()>> = images
        .par_chunks_mut(n)
        .zip(files.par_iter())
        .map(|(out, (path, _))| decode_into(path, size, out))
        .collect();
    let mut labels = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    for (i, ((path, label), result)) in files.into_iter().zip(results).enumerate() {
        match result {
            Ok(()) => {
                images.copy_within(i * n..(i + 1) * n, labels.len() * n);
                labels.push(label);
            }
            Err(e) if skip_bad => skipped.push((path, describe(&e))),
            Err(e) => bail!(
                "{} (the skip-bad option leaves unreadable images out)",
                describe(&e)
            ),
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
        (3, size, size),
    )?;
    Ok(FolderSplit { data, skipped })
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

/// Decode one image (format from its content), convert to RGB, resize to
/// `size` x `size` with a bilinear filter, and write its `[3, size, size]`
/// planes to `out`.
pub fn decode_into(path: &Path, size: usize, out: &mut [u8]) -> Result<()> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .with_context(|| format!("opening image {}", path.display()))?
        .decode()
        .with_context(|| format!("decoding image {}", path.display()))?
        .into_rgb8();
    let side = size as u32;
    let img = if img.dimensions() == (side, side) {
        img
    } else {
        image::imageops::resize(&img, side, side, FilterType::Triangle)
    };
    interleaved_to_planes(img.as_raw(), 3, out);
    Ok(())
}

/// `[h*w, c]` interleaved pixels to `[c, h*w]` planes in `planes`.
pub fn interleaved_to_planes(pixels: &[u8], channels: usize, planes: &mut [u8]) {
    let hw = pixels.len() / channels;
    for (i, px) in pixels.chunks_exact(channels).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            planes[c * hw + i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
