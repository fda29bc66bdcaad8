//! `--data SPEC`: from a spec to a (train, test) pair of data sets.
//!
//! SPEC is `demo` (the built-in synthetic set), or a folder holding
//! - CIFAR-10 binaries (`data_batch_*.bin` + `test_batch.bin`),
//! - CIFAR-100 binaries (`train.bin` + `test.bin`; fine labels),
//!   either directly or in a `cifar-10-batches-bin/` or `cifar-100-binary/`
//!   sub-folder (the names of the official archives),
//! - torchvision's CIFAR python pickles (`data_batch_1`.. + `test_batch` +
//!   `batches.meta`, or `train` + `test` + `meta`; fine labels), directly
//!   or in `cifar-10-batches-py/` or `cifar-100-python/` (the folder
//!   torchvision is given as `root` holds these),
//! - a Hugging Face datasets parquet folder: `*.parquet` files in `data/`
//!   (the hub's layout) or directly, named by split (train; test, else
//!   validation), or
//! - image folders: `train/` and `test/` (or `val/`), one sub-folder per class.
//!
//! Finding the files (`DataSource::resolve`) is separate from reading them
//! (`DataSource::load`), so a command can report what it found before the
//! slow part.

use super::cifar::{self, CifarKind};
use super::cifar_pickle::{self, PYTHON_SUBFOLDERS};
use super::demo::{self, DemoConfig};
use super::hf_parquet::{self, ColumnChoice};
use super::{folder, Dataset};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Sub-folders, inside the given folder, where the official CIFAR archives
/// unpack.
pub const CIFAR_SUBFOLDERS: [&str; 2] = ["cifar-10-batches-bin", "cifar-100-binary"];

/// How a CIFAR folder stores its batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarFormat {
    /// The binary records of `cifar-10-batches-bin/`, `cifar-100-binary/`.
    Binary,
    /// The pickles of `cifar-10-batches-py/`, `cifar-100-python/`, with
    /// the class names in the meta pickle beside them.
    Python,
}

/// Where the data comes from, with every file or folder found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    Demo,
    Cifar {
        kind: CifarKind,
        format: CifarFormat,
        train: Vec<PathBuf>,
        test: PathBuf,
    },
    /// Hugging Face parquet files of each split, in name order.
    Parquet {
        train: Vec<PathBuf>,
        test: Vec<PathBuf>,
    },
    ImageFolder {
        train: PathBuf,
        test: PathBuf,
    },
}

/// How to read the data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Side of the stored square images for image folders and parquet
    /// files (each image is resized to it). CIFAR images stay 32x32; the
    /// demo uses `demo.image_size`.
    pub image_size: usize,
    /// The image and label columns of parquet files (None: detected). Given
    /// for another source, they are an error.
    pub columns: ColumnChoice,
    /// Leave unreadable images of an image folder out (and list them) instead
    /// of failing.
    pub skip_bad: bool,
    /// Bytes the decoded images may take (`--data-memory`): image folders
    /// and parquet data whose decoded splits together exceed it are
    /// streamed, decoded per batch within it. None: always decode whole.
    pub memory_budget: Option<u64>,
    pub demo: DemoConfig,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            image_size: 32,
            columns: ColumnChoice::default(),
            skip_bad: false,
            memory_budget: None,
            demo: DemoConfig::default(),
        }
    }
}

/// The loaded data.
#[derive(Debug)]
pub struct Loaded {
    pub train: Dataset,
    pub test: Dataset,
    /// Images left out with `skip_bad`: path and reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// What was read, for messages: "CIFAR-100 in /data/cifar-100-binary".
    pub source: String,
}

impl Loaded {
    /// One line for the log: source, sizes, classes, skipped images.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} train / {} test images, {}x{}x{}, {} classes",
            self.source,
            self.train.len(),
            self.test.len(),
            self.train.channels,
            self.train.height,
            self.train.width,
            self.train.classes
        );
        if !self.skipped.is_empty() {
            s.push_str(&format!(
                ", {} unreadable images skipped",
                self.skipped.len()
            ));
        }
        s
    }
}

/// Resolve `spec` and load both splits.
pub fn load_data(spec: &str, opts: &LoadOptions) -> Result<Loaded> {
    DataSource::resolve(spec)?.load(opts)
}

impl DataSource {
    /// Find the data that `spec` names (see the module doc).
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec == "demo" {
            return Ok(DataSource::Demo);
        }
        let root = Path::new(spec);
        if !root.is_dir() {
            bail!("data '{spec}' is neither 'demo' nor an existing folder");
        }
        let candidates = std::iter::once(root.to_path_buf())
            .chain(CIFAR_SUBFOLDERS.iter().map(|s| root.join(s)))
            .chain(PYTHON_SUBFOLDERS.iter().map(|s| root.join(s)));
        for dir in candidates.filter(|d| d.is_dir()) {
            if let Some(source) = find_cifar(&dir)? {
                return Ok(source);
            }
            if let Some(source) = find_cifar_python(&dir)? {
                return Ok(source);
            }
        }
        if let Some(source) = find_parquet(root)? {
            return Ok(source);
        }
        find_image_folders(root)
    }

    /// Whether the images are resized at load to `LoadOptions::image_size`
    /// (image folders, parquet), rather than kept at the size the source
    /// stores.
    pub fn resized_at_load(&self) -> bool {
        matches!(
            self,
            DataSource::ImageFolder { .. } | DataSource::Parquet { .. }
        )
    }

    /// Read the training and test splits.
    pub fn load(&self, opts: &LoadOptions) -> Result<Loaded> {
        let is_parquet = matches!(self, DataSource::Parquet { .. });
        if !is_parquet && opts.columns != ColumnChoice::default() {
            bail!("--image-column and --label-column name columns of parquet data; this data is not parquet");
        }
        match self {
            DataSource::Demo => {
                let (train, test) = demo::generate(&opts.demo)?;
                let source = format!("demo data (seed {})", opts.demo.seed);
                Ok(Loaded {
                    train,
                    test,
                    skipped: Vec::new(),
                    source,
                })
            }
            DataSource::Cifar {
                kind,
                format,
                train,
                test,
            } => {
                let test_files = std::slice::from_ref(test);
                let (train_ds, test_ds) = match format {
                    CifarFormat::Binary => (
                        cifar::load_files(*kind, train)?,
                        cifar::load_files(*kind, test_files)?,
                    ),
                    CifarFormat::Python => {
                        let meta = test.with_file_name(cifar_pickle::meta_file(*kind));
                        (
                            cifar_pickle::load_files(*kind, train, &meta)?,
                            cifar_pickle::load_files(*kind, test_files, &meta)?,
                        )
                    }
                };
                let dir = test.parent().unwrap_or(Path::new("."));
                let form = match format {
                    CifarFormat::Binary => "",
                    CifarFormat::Python => " (python pickles)",
                };
                let source = format!("{}{form} in {}", kind.name(), dir.display());
                Ok(Loaded {
                    train: train_ds,
                    test: test_ds,
                    skipped: Vec::new(),
                    source,
                })
            }
            DataSource::Parquet { train, test } => {
                let data = hf_parquet::load(
                    train,
                    test,
                    &opts.columns,
                    opts.image_size,
                    opts.memory_budget,
                )?;
                let dir = test[0].parent().unwrap_or(Path::new("."));
                let source = format!(
                    "Hugging Face parquet in {} ({} train / {} test files; {})",
                    dir.display(),
                    train.len(),
                    test.len(),
                    data.description
                );
                Ok(Loaded {
                    train: data.train,
                    test: data.test,
                    skipped: Vec::new(),
                    source,
                })
            }
            DataSource::ImageFolder { train, test } => load_image_folders(train, test, opts),
        }
    }
}

fn load_image_folders(train: &Path, test: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let classes = folder::class_names(train)?;
    let image_bytes = 3 * (opts.image_size as u64).pow(2);
    let images =
        folder::count_images(train, &classes, true)? + folder::count_images(test, &classes, false)?;
    let stream_budget = opts
        .memory_budget
        .filter(|&budget| images as u64 * image_bytes > budget);
    let split = |is_training_split| folder::SplitOptions {
        size: opts.image_size,
        skip_bad: opts.skip_bad,
        stream_budget,
        is_training_split,
    };
    let train_split = folder::load_split(train, &classes, split(true))?;
    let test_split = folder::load_split(test, &classes, split(false))?;
    let mut skipped = train_split.skipped;
    skipped.extend(test_split.skipped);
    let root = train.parent().unwrap_or(Path::new("."));
    let streamed = if stream_budget.is_some() {
        format!(
            " (streamed: {} MiB decoded exceeds the data memory budget)",
            (images as u64 * image_bytes) >> 20
        )
    } else {
        String::new()
    };
    let source = format!("image folders in {}{streamed}", root.display());
    Ok(Loaded {
        train: train_split.data,
        test: test_split.data,
        skipped,
        source,
    })
}

/// The CIFAR files directly in `dir`, if there are any. Half a set (training
/// files without the test file or the reverse) is an error naming what is
/// missing.
fn find_cifar(dir: &Path) -> Result<Option<DataSource>> {
    let batches = cifar10_batches(dir, ".bin")?;
    let test_batch = dir.join("test_batch.bin");
    if !batches.is_empty() || test_batch.is_file() {
        if batches.is_empty() {
            bail!(
                "{} has test_batch.bin but no CIFAR-10 training files data_batch_*.bin",
                dir.display()
            );
        }
        if !test_batch.is_file() {
            bail!(
                "{} has CIFAR-10 training files data_batch_*.bin but no test_batch.bin (missing test split)",
                dir.display()
            );
        }
        return Ok(Some(DataSource::Cifar {
            kind: CifarKind::Cifar10,
            format: CifarFormat::Binary,
            train: batches,
            test: test_batch,
        }));
    }
    let (train, test) = (dir.join("train.bin"), dir.join("test.bin"));
    match (train.is_file(), test.is_file()) {
        (true, true) => Ok(Some(DataSource::Cifar {
            kind: CifarKind::Cifar100,
            format: CifarFormat::Binary,
            train: vec![train],
            test,
        })),
        (true, false) => bail!(
            "{} has CIFAR-100 train.bin but no test.bin (missing test split)",
            dir.display()
        ),
        (false, true) => bail!("{} has CIFAR-100 test.bin but no train.bin", dir.display()),
        (false, false) => Ok(None),
    }
}

/// The CIFAR python pickles directly in `dir`, if there are any: the
/// batches, the test batch and the meta file, all three (a missing one is
/// an error naming it).
fn find_cifar_python(dir: &Path) -> Result<Option<DataSource>> {
    let batches = cifar10_batches(dir, "")?;
    let (test10, train100, test100) = (dir.join("test_batch"), dir.join("train"), dir.join("test"));
    let (kind, train, test) = if !batches.is_empty() || test10.is_file() {
        (CifarKind::Cifar10, batches, test10)
    } else if train100.is_file() || test100.is_file() {
        (CifarKind::Cifar100, vec![train100], test100)
    } else {
        return Ok(None);
    };
    let meta = dir.join(cifar_pickle::meta_file(kind));
    let train_name = match kind {
        CifarKind::Cifar10 => "data_batch_1..5",
        CifarKind::Cifar100 => "train",
    };
    let missing: Vec<String> = [
        (!train.iter().any(|p| p.is_file())).then(|| train_name.to_string()),
        (!test.is_file()).then(|| file_name(&test)),
        (!meta.is_file()).then(|| file_name(&meta)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        bail!(
            "{} holds {} python pickles but lacks {}",
            dir.display(),
            kind.name(),
            missing.join(" and ")
        );
    }
    Ok(Some(DataSource::Cifar {
        kind,
        format: CifarFormat::Python,
        train,
        test,
    }))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The split names a parquet file's name may hold.
const PARQUET_SPLITS: [&str; 3] = ["train", "test", "validation"];

/// Hugging Face parquet files in `root/data/` (the hub's layout), else
/// directly in `root`, by split: train, and test (validation when there
/// is no test). Files named by no split (`unsupervised`, `extra`) are not
/// read; a file named by two is an error.
fn find_parquet(root: &Path) -> Result<Option<DataSource>> {
    let data = root.join("data");
    let mut files = if data.is_dir() {
        parquet_files(&data)?
    } else {
        Vec::new()
    };
    if files.is_empty() {
        files = parquet_files(root)?;
    }
    if files.is_empty() {
        return Ok(None);
    }
    let mut splits: [Vec<PathBuf>; 3] = Default::default();
    for path in files {
        let name = file_name(&path).to_ascii_lowercase();
        let named: Vec<usize> = (0..3)
            .filter(|&i| name.contains(PARQUET_SPLITS[i]))
            .collect();
        match named[..] {
            [i] => splits[i].push(path),
            [] => {}
            _ => bail!(
                "parquet file {} names more than one split ({})",
                path.display(),
                named
                    .iter()
                    .map(|&i| PARQUET_SPLITS[i])
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let [train, test, validation] = splits;
    let dir = if data.is_dir() {
        data
    } else {
        root.to_path_buf()
    };
    if train.is_empty() {
        bail!(
            "{} holds parquet files but none with 'train' in its name",
            dir.display()
        );
    }
    let test = if test.is_empty() { validation } else { test };
    if test.is_empty() {
        bail!(
            "missing test split: {} holds parquet files for train but none with 'test' or 'validation' in its name",
            dir.display()
        );
    }
    Ok(Some(DataSource::Parquet { train, test }))
}

/// The `*.parquet` files of `dir`, sorted by name.
fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
        {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// `data_batch_<n><suffix>` files in `dir`, ordered by `n`.
fn cifar10_batches(dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let number = name
            .strip_prefix("data_batch_")
            .and_then(|r| r.strip_suffix(suffix))
            .and_then(|n| n.parse::<u32>().ok());
        if let (Some(n), true) = (number, path.is_file()) {
            found.push((n, path));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// `root/train` and `root/test` (or `root/val`).
fn find_image_folders(root: &Path) -> Result<DataSource> {
    let train = root.join("train");
    if !train.is_dir() {
        bail!(
            "{} holds no CIFAR files (data_batch_*.bin + test_batch.bin, or train.bin + test.bin, here or in {}; \
             torchvision's pickles here or in {}), no parquet files (here or in data/) and no train/ image folder",
            root.display(),
            CIFAR_SUBFOLDERS.join(" or "),
            PYTHON_SUBFOLDERS.join(" or ")
        );
    }
    let Some(test) = ["test", "val"]
        .iter()
        .map(|s| root.join(s))
        .find(|p| p.is_dir())
    else {
        bail!(
            "missing test split: {} has train/ but neither test/ nor val/",
            root.display()
        );
    };
    Ok(DataSource::ImageFolder { train, test })
}
