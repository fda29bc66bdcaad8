//! Glue shared by the subcommands: choosing and loading data, loading or
//! initializing a model, the image transform, and the provenance
//! (`RunMeta`) that every checkpoint carries.

use super::common::DataFlags;
use anyhow::{bail, Context, Result};
use effrank_engine::data::hf_parquet::ColumnChoice;
use effrank_engine::data::{load_data, DataSource, Dataset, LoadOptions, Normalize};
use effrank_engine::model::checkpoint::read_metadata;
use effrank_engine::model::import::{load_any, ImportOptions, ImportRecord, NoHead};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::{dense_ranks, Ranks};
use effrank_engine::model::{VitConfig, VitParams};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::provenance::{DataRef, RunMeta};
use effrank_engine::train::RunFiles;
use std::path::{Path, PathBuf};

/// Training images of the demo data when nothing says otherwise.
const DEFAULT_DEMO_IMAGES: usize = 4000;
/// The data memory budget when /proc/meminfo cannot be read.
const FALLBACK_DATA_MEMORY: u64 = 4 << 30;

/// What a model needs of its input images: its input side, and the
/// intermediate resize before the center crop (`--resize`, or the model's
/// recorded one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelInput {
    pub side: usize,
    pub resize: Option<usize>,
}

impl ModelInput {
    /// The input of `model` as `flags` prepare it.
    pub fn of(model: &HostModel, flags: &DataFlags) -> Self {
        ModelInput {
            side: model.cfg.image_size,
            resize: flags.resize.or(model.resize),
        }
    }

    /// The side that image folders are stored at so that nothing is lost
    /// before the model's own resize: the intermediate resize when there
    /// is one, else the input side.
    pub fn stored_side(&self) -> usize {
        self.resize.unwrap_or(self.side)
    }
}

/// The data to load: each `DataFlags` value as given, else as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataChoice {
    pub source: String,
    /// Side of the stored images of an image folder.
    pub image_size: usize,
    /// Where `image_size` came from, as the run records it.
    pub image_size_from: String,
    /// Whether the source is resized to `image_size` at load (image
    /// folders); other sources keep the size they store.
    pub resized_at_load: bool,
    pub demo_images: usize,
    pub skip_bad: bool,
    /// Parquet columns (`--image-column`, `--label-column`).
    pub columns: ColumnChoice,
    /// Bytes the decoded images may take before they are streamed.
    pub memory_budget: u64,
}

impl DataFlags {
    /// The data named by the flags, for a model whose input is `model`;
    /// what a flag leaves open comes from `recorded` (the data a
    /// checkpoint's run used) when that names the same source, else the
    /// default. The one place that sizes image folders: the explicit
    /// `--image-size`, else the recorded size, else what the model needs
    /// (`ModelInput::stored_side`); a size below that need is never taken
    /// silently.
    pub fn choose(&self, recorded: Option<&DataRef>, model: ModelInput) -> DataChoice {
        let source = self
            .data
            .clone()
            .or_else(|| recorded.map(|r| r.source.clone()))
            .unwrap_or_else(|| "demo".into());
        let same = recorded.filter(|r| r.source == source);
        let needed = model.stored_side();
        let (image_size, image_size_from) = match (self.image_size, same) {
            (Some(n), _) => (n, "--image-size".to_string()),
            (None, Some(r)) => (r.image_size, "recorded by the run".to_string()),
            (None, None) if model.resize.is_some() => (needed, "--resize".to_string()),
            (None, None) => (needed, "model input size".to_string()),
        };
        let resized_at_load = matches!(
            DataSource::resolve(&source),
            Ok(source) if source.resized_at_load()
        );
        if resized_at_load && image_size < needed {
            eprintln!(
                "warning: the images of --data {source} are stored at {image_size} px ({image_size_from}), \
                 smaller than the {needed} px the model needs: they lose detail and are scaled \
                 back up (give --image-size {needed} to store them at the model's size)"
            );
        }
        DataChoice {
            image_size,
            image_size_from,
            resized_at_load,
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
            memory_budget: self.memory_budget(),
            source,
        }
    }

    /// `--data-memory` in bytes, else half the memory available now.
    pub fn memory_budget(&self) -> u64 {
        match self.data_memory {
            Some(gib) => (gib * (1u64 << 30) as f64) as u64,
            None => available_memory().map_or(FALLBACK_DATA_MEMORY, |a| a / 2),
        }
    }
}

/// `MemAvailable` of /proc/meminfo in bytes (None where there is none).
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The training and test sets of `choice`, with their description.
pub fn load_data_for(choice: &DataChoice, quiet: bool) -> Result<(Dataset, Dataset, DataRef)> {
    let mut opts = LoadOptions {
        skip_bad: choice.skip_bad,
        image_size: choice.image_size,
        columns: choice.columns.clone(),
        memory_budget: Some(choice.memory_budget),
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
    // A source not resized at load records the size it stores, not a
    // choice it ignored.
    let (image_size, image_size_from) = if choice.resized_at_load {
        (choice.image_size, choice.image_size_from.clone())
    } else {
        (train.height, "stored by the source".to_string())
    };
    let data = DataRef {
        image_column: choice.columns.image.clone(),
        label_column: choice.columns.label.clone(),
        image_size_from: Some(image_size_from),
        ..DataRef::new(
            &choice.source,
            image_size,
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
    /// The MLP's activation (`--act`).
    pub act: Option<effrank_engine::ops::gelu::Activation>,
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
        if let Some(act) = self.act {
            cfg.family.act = act;
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
        .or(ck.import.as_ref().and_then(|i| i.normalize))
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

/// A model about to be trained, before its head is fitted to the data's
/// classes: what it needs of the data is known before the data is loaded.
pub enum ModelProbe {
    Preset {
        name: String,
        seed: u64,
        cfg: VitConfig,
    },
    Checkpoint {
        path: PathBuf,
        import: ImportOptions,
        model: Box<HostModel>,
    },
}

impl ModelProbe {
    /// The preset's shape (with the overrides) or the loaded checkpoint.
    pub fn new(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Preset { name, seed, shape } => {
                // The head's size does not change the input; the data sets it later.
                let mut cfg = VitConfig::from_name_or_file(name, 1)?;
                shape.apply(&mut cfg)?;
                Ok(ModelProbe::Preset {
                    name: name.clone(),
                    seed: *seed,
                    cfg,
                })
            }
            ModelSource::Checkpoint { path, import } => {
                let model = match load_model_with(path, import) {
                    // A backbone without a head: a placeholder one until the
                    // data says the classes (`for_classes`).
                    Err(e) if e.downcast_ref::<NoHead>().is_some() => {
                        let placeholder = ImportOptions {
                            new_classes: Some(1),
                            ..import.clone()
                        };
                        load_model_with(path, &placeholder)?
                    }
                    other => other?,
                };
                Ok(ModelProbe::Checkpoint {
                    path: path.clone(),
                    import: import.clone(),
                    model: Box::new(model),
                })
            }
        }
    }

    /// What the model needs of its input images as `flags` prepare them.
    pub fn input(&self, flags: &DataFlags) -> ModelInput {
        match self {
            ModelProbe::Preset { cfg, .. } => ModelInput {
                side: cfg.image_size,
                resize: flags.resize,
            },
            ModelProbe::Checkpoint { model, .. } => ModelInput::of(model, flags),
        }
    }

    /// A dense model for `classes` classes: the preset freshly initialized,
    /// or the checkpoint (its head replaced when its classes differ).
    pub fn for_classes(self, classes: usize) -> Result<HostModel> {
        match self {
            ModelProbe::Preset { name, seed, cfg } => {
                let preset = VitConfig::from_name_or_file(&name, classes)?;
                if preset.classes != classes {
                    bail!(
                        "model config {name} has {} classes, the data has {classes}",
                        preset.classes
                    );
                }
                let cfg = VitConfig { classes, ..cfg };
                let ranks = dense_ranks(&cfg);
                let params = init_params(&cfg, &ranks, seed);
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
            ModelProbe::Checkpoint {
                path,
                import,
                model,
            } => {
                if model.cfg.classes == classes {
                    return Ok(*model);
                }
                let opts = ImportOptions {
                    new_classes: Some(classes),
                    ..import
                };
                load_model_with(&path, &opts)
            }
        }
    }
}

/// A dense model for `classes` classes: a preset freshly initialized, or a
/// checkpoint (its head replaced when its classes differ).
pub fn load_teacher_or_init(source: &ModelSource, classes: usize) -> Result<HostModel> {
    ModelProbe::new(source)?.for_classes(classes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(image_size: Option<usize>, resize: Option<usize>) -> DataFlags {
        DataFlags {
            data: Some("some/folder".into()),
            normalize: None,
            resize,
            skip_bad: false,
            image_size,
            data_memory: Some(0.5),
            demo_images: None,
            image_column: None,
            label_column: None,
        }
    }

    fn recorded(source: &str, image_size: usize) -> DataRef {
        DataRef {
            source: source.into(),
            image_size,
            image_size_from: None,
            demo_images: 4000,
            image_column: None,
            label_column: None,
            train: "t".into(),
            test: "t".into(),
        }
    }

    const MODEL: ModelInput = ModelInput {
        side: 64,
        resize: None,
    };

    #[test]
    fn image_folders_take_the_models_size_unless_told_or_recorded() {
        let chosen = |f: DataFlags, r: Option<&DataRef>, m| {
            let c = f.choose(r, m);
            (c.image_size, c.image_size_from)
        };
        let size = |n: usize, from: &str| (n, from.to_string());
        assert_eq!(
            chosen(flags(None, None), None, MODEL),
            size(64, "model input size")
        );
        let resized = ModelInput {
            resize: Some(80),
            ..MODEL
        };
        assert_eq!(
            chosen(flags(None, None), None, resized),
            size(80, "--resize")
        );
        assert_eq!(
            chosen(flags(Some(48), None), None, MODEL),
            size(48, "--image-size")
        );
        let same = recorded("some/folder", 40);
        assert_eq!(
            chosen(flags(None, None), Some(&same), MODEL),
            size(40, "recorded by the run")
        );
        assert_eq!(
            chosen(flags(Some(64), None), Some(&same), MODEL),
            size(64, "--image-size")
        );
        // Another source's record says nothing about this one.
        let other = recorded("elsewhere", 40);
        assert_eq!(
            chosen(flags(None, None), Some(&other), MODEL),
            size(64, "model input size")
        );
        assert_eq!(flags(None, None).memory_budget(), 1 << 29);
    }
}
