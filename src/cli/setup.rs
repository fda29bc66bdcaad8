//! Glue shared by the subcommands: choosing and loading data, loading or
//! initializing a model, the image transform, and the provenance
//! (`RunMeta`) that every checkpoint carries.

use super::common::DataFlags;
use anyhow::{bail, Context, Result};
use effrank_engine::data::hf_parquet::ColumnChoice;
use effrank_engine::data::{load_data, DataSource, Dataset, LoadOptions, Normalize};
use effrank_engine::model::checkpoint::read_metadata;
use effrank_engine::model::import::{load_any, ImportOptions, ImportRecord};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::{dense_ranks, Ranks};
use effrank_engine::model::{VitConfig, VitParams};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::provenance::{DataRef, RunMeta};
use effrank_engine::train::RunFiles;
use std::path::{Path, PathBuf};

/// Side of the stored images of an image folder when nothing says otherwise.
const DEFAULT_IMAGE_SIZE: usize = 32;
/// Training images of the demo data when nothing says otherwise.
const DEFAULT_DEMO_IMAGES: usize = 4000;

/// The data to load: each `DataFlags` value as given, else as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataChoice {
    pub source: String,
    pub image_size: usize,
    pub demo_images: usize,
    pub skip_bad: bool,
    /// Parquet columns (`--image-column`, `--label-column`).
    pub columns: ColumnChoice,
}

impl DataFlags {
    /// The data named by the flags; what a flag leaves open comes from
    /// `recorded` (the data a checkpoint's run used) when that names the
    /// same source, else the default.
    pub fn choose(&self, recorded: Option<&DataRef>) -> DataChoice {
        let source = self
            .data
            .clone()
            .or_else(|| recorded.map(|r| r.source.clone()))
            .unwrap_or_else(|| "demo".into());
        let same = recorded.filter(|r| r.source == source);
        DataChoice {
            image_size: self
                .image_size
                .or(same.map(|r| r.image_size))
                .unwrap_or(DEFAULT_IMAGE_SIZE),
            demo_images: self
                .demo_images
                .or(same.map(|r| r.demo_images))
                .unwrap_or(DEFAULT_DEMO_IMAGES),
            skip_bad: self.skip_bad,
            columns: ColumnChoice {
                image: (self.image_column.clone())
                    .or_else(|| same.and_then(|r| r.image_column.clone())),
                label: (self.label_column.clone())
                    .or_else(|| same.and_then(|r| r.label_column.clone())),
            },
            source,
        }
    }
}

/// The training and test sets of `choice`, with their description.
pub fn load_data_for(choice: &DataChoice, quiet: bool) -> Result<(Dataset, Dataset, DataRef)> {
    let mut opts = LoadOptions {
        skip_bad: choice.skip_bad,
        image_size: choice.image_size,
        columns: choice.columns.clone(),
        ..LoadOptions::default()
    };
    opts.demo.train = choice.demo_images;
    opts.demo.test = (choice.demo_images / 4).max(1);
    let loaded = load_data(&choice.source, &opts)
        .with_context(|| format!("loading --data {}", choice.source))?;
    if !quiet {
        eprintln!("data: {}", loaded.summary());
    }
    let (train, test) = (loaded.train, loaded.test);
    if train.is_empty() || test.is_empty() {
        bail!(
            "--data {}: the training set has {} images and the test set {}; both must be non-empty",
            choice.source,
            train.len(),
            test.len()
        );
    }
    let data = DataRef {
        image_column: choice.columns.image.clone(),
        label_column: choice.columns.label.clone(),
        ..DataRef::new(
            &choice.source,
            choice.image_size,
            choice.demo_images,
            &train,
            &test,
        )
    };
    Ok((train, test, data))
}

/// A warning when `given` is not the data `run` recorded (`what` names the
/// checkpoint: "the teacher", "the checkpoint").
pub fn warn_if_other_data(run: Option<&RunMeta>, given: &DataRef, what: &str) {
    let Some(recorded) = run.and_then(|r| r.data.as_ref()) else {
        return;
    };
    let differences = recorded.differences(given);
    if !differences.is_empty() {
        eprintln!("warning: {what} was trained on other data than --data {} gives ({}; it recorded --data {})", given.source, differences.join(", "), recorded.source);
    }
}

/// The provenance of the run in `files` that is about to be resumed (the
/// `RunMeta` of its last checkpoint), if one is.
pub fn load_resumed_run(files: &RunFiles) -> Result<Option<RunMeta>> {
    if !files.state().is_file() || !files.model().is_file() {
        return Ok(None);
    }
    RunMeta::from_metadata(&read_metadata(&files.model())?, &files.model())
}

/// Changes to a preset's shape from the command line.
#[derive(Clone, Debug, Default)]
pub struct ShapeOverrides {
    pub image_size: Option<usize>,
    pub patch: Option<usize>,
    pub width: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    pub mlp: Option<usize>,
}

impl ShapeOverrides {
    fn apply(&self, cfg: &mut VitConfig) -> Result<()> {
        let fields = [
            (&mut cfg.image_size, self.image_size),
            (&mut cfg.patch, self.patch),
            (&mut cfg.width, self.width),
            (&mut cfg.depth, self.depth),
            (&mut cfg.heads, self.heads),
            (&mut cfg.mlp, self.mlp),
        ];
        for (field, value) in fields {
            if let Some(v) = value {
                *field = v;
            }
        }
        cfg.validate()
    }
}

/// Where a model comes from.
pub enum ModelSource {
    Preset {
        name: String,
        seed: u64,
        shape: ShapeOverrides,
    },
    Checkpoint {
        path: PathBuf,
        /// `--heads` and `--input-size` (its `new_classes` is the data's).
        import: ImportOptions,
    },
}

/// A model on the host with what the checkpoint said about it.
pub struct HostModel {
    pub cfg: VitConfig,
    pub ranks: Ranks,
    pub params: VitParams<Vec<f32>>,
    /// The normalization the model was trained with, when known.
    pub normalize: Option<Normalize>,
    /// The intermediate resize (then center crop) it was trained with.
    pub resize: Option<usize>,
    /// The provenance the engine recorded in the file (None for other
    /// libraries' files and fresh models).
    pub run: Option<RunMeta>,
    /// How it was imported (or resampled) now, else how the checkpoint it
    /// was trained from was, as its run recorded; for the run metadata.
    pub import: Option<ImportRecord>,
}

/// Load any checkpoint (engine, timm, torchvision, HF names; a file or a
/// hub folder) as `opts` say, announcing on stderr what was guessed.
pub fn load_model_with(path: &Path, opts: &ImportOptions) -> Result<HostModel> {
    let ck =
        load_any(path, opts).with_context(|| format!("loading checkpoint {}", path.display()))?;
    if let Some(record) = &ck.import {
        for notice in record.notices(ck.cfg.width) {
            eprintln!("{notice}");
        }
    }
    let run = RunMeta::from_metadata(&ck.metadata, path)?;
    // Files written before the engine recorded a `RunMeta` kept only a `normalize` key.
    let legacy = ck
        .metadata
        .get("normalize")
        .map(|n| {
            n.parse::<Normalize>()
                .with_context(|| format!("{}: metadata 'normalize'", path.display()))
        })
        .transpose()?;
    let normalize = run
        .as_ref()
        .map(|r| r.normalize)
        .or(legacy)
        .or(ck.scheme.default_normalize());
    let resize = run.as_ref().and_then(|r| r.resize);
    let import = ck
        .import
        .or_else(|| run.as_ref().and_then(|r| r.import.clone()));
    Ok(HostModel {
        cfg: ck.cfg,
        ranks: ck.ranks,
        params: ck.params,
        normalize,
        resize,
        run,
        import,
    })
}

/// A dense model for `classes` classes: a preset freshly initialized, or a
/// checkpoint (its head replaced when its classes differ).
pub fn load_teacher_or_init(source: &ModelSource, classes: usize) -> Result<HostModel> {
    match source {
        ModelSource::Preset { name, seed, shape } => {
            let mut cfg = VitConfig::from_name_or_file(name, classes)?;
            shape.apply(&mut cfg)?;
            if cfg.classes != classes {
                bail!(
                    "model config {name} has {} classes, the data has {classes}",
                    cfg.classes
                );
            }
            let ranks = dense_ranks(&cfg);
            let params = init_params(&cfg, &ranks, *seed);
            Ok(HostModel {
                cfg,
                ranks,
                params,
                normalize: None,
                resize: None,
                run: None,
                import: None,
            })
        }
        ModelSource::Checkpoint { path, import } => {
            let probe = load_model_with(path, import)?;
            if probe.cfg.classes == classes {
                return Ok(probe);
            }
            let opts = ImportOptions {
                new_classes: Some(classes),
                ..import.clone()
            };
            load_model_with(path, &opts)
        }
    }
}

/// Raw stored images → model input, through `resize` and a center crop
/// when given (`--resize`; the model's own input size means none).
pub fn transform_for(
    cfg: &VitConfig,
    data: &Dataset,
    normalize: Normalize,
    resize: Option<usize>,
) -> Result<ImageTransform> {
    if data.channels != cfg.channels {
        bail!(
            "the data has {} channels, the model expects {}",
            data.channels,
            cfg.channels
        );
    }
    if let Some(r) = resize.filter(|&r| r < cfg.image_size) {
        bail!("--resize {r} is smaller than the model's input size {0}: the center crop of {0} pixels needs at least that many", cfg.image_size);
    }
    normalize.transform(
        data,
        cfg.image_size,
        resize.filter(|&r| r != cfg.image_size),
    )
}

/// Normalization and resize as the flags give them, else as `model`
/// recorded, else the data's defaults; and the transform they make.
pub fn model_input(
    flags: &DataFlags,
    model: &HostModel,
    data: &Dataset,
    source: &str,
) -> Result<(Normalize, ImageTransform)> {
    let normalize = choose_normalize(flags.normalize, model.normalize, source);
    Ok((
        normalize,
        transform_for(&model.cfg, data, normalize, flags.resize.or(model.resize))?,
    ))
}

/// The normalization for a model trained from scratch on `--data`: CIFAR's
/// statistics for CIFAR, mean = std = 0.5 otherwise.
pub fn default_normalize(data: &str) -> Normalize {
    match DataSource::resolve(data) {
        Ok(DataSource::Cifar { .. }) => Normalize::Cifar,
        _ => Normalize::Half,
    }
}

/// `--normalize` if given, else the model's own, else the data's default.
pub fn choose_normalize(
    flag: Option<Normalize>,
    model: Option<Normalize>,
    data: &str,
) -> Normalize {
    flag.or(model).unwrap_or_else(|| default_normalize(data))
}
