//! Glue shared by the subcommands: loading data, loading or initializing a
//! model, the image transform, and the metadata stored in checkpoints.

use super::common::DataFlags;
use anyhow::{bail, Context, Result};
use effrank_engine::ops::image::ImageTransform;
use effrank_engine::data::{load_data, DataSource, Dataset, LoadOptions, Normalize};
use effrank_engine::model::import::{load_any, ImportOptions};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::{dense_ranks, Ranks};
use effrank_engine::model::{VitConfig, VitParams};
use effrank_engine::train::LossSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Load the training and test sets named by `--data`.
pub fn load_data_for(flags: &DataFlags, quiet: bool) -> Result<(Dataset, Dataset)> {
    let mut opts = LoadOptions { skip_bad: flags.skip_bad, image_size: flags.image_size, ..LoadOptions::default() };
    opts.demo.train = flags.demo_images;
    opts.demo.test = (flags.demo_images / 4).max(1);
    let loaded = load_data(&flags.data, &opts).with_context(|| format!("loading --data {}", flags.data))?;
    if !quiet {
        eprintln!("data: {}", loaded.summary());
    }
    let (train, test) = (loaded.train, loaded.test);
    if train.is_empty() || test.is_empty() {
        bail!("--data {}: the training set has {} images and the test set {}; both must be non-empty", flags.data, train.len(), test.len());
    }
    Ok((train, test))
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
    Preset { name: String, seed: u64, shape: ShapeOverrides },
    Checkpoint { path: PathBuf, heads: Option<usize> },
}

/// A model on the host with what the checkpoint said about it.
pub struct HostModel {
    pub cfg: VitConfig,
    pub ranks: Ranks,
    pub params: VitParams<Vec<f32>>,
    /// The normalization the model was trained with, when known.
    pub normalize: Option<Normalize>,
    pub metadata: BTreeMap<String, String>,
}

/// Load any checkpoint (engine, timm, torchvision, HF names).
pub fn load_model(path: &Path, heads: Option<usize>, new_classes: Option<usize>) -> Result<HostModel> {
    let opts = ImportOptions { heads, new_classes };
    let ck = load_any(path, &opts).with_context(|| format!("loading checkpoint {}", path.display()))?;
    let normalize = match ck.metadata.get("normalize") {
        Some(n) => Some(n.parse::<Normalize>().with_context(|| format!("{}: metadata 'normalize'", path.display()))?),
        None => ck.scheme.default_normalize(),
    };
    Ok(HostModel { cfg: ck.cfg, ranks: ck.ranks, params: ck.params, normalize, metadata: ck.metadata })
}

/// A dense model for `classes` classes: a preset freshly initialized, or a
/// checkpoint (its head replaced when its classes differ).
pub fn load_teacher_or_init(source: &ModelSource, classes: usize) -> Result<HostModel> {
    match source {
        ModelSource::Preset { name, seed, shape } => {
            let mut cfg = VitConfig::from_name_or_file(name, classes)?;
            shape.apply(&mut cfg)?;
            if cfg.classes != classes {
                bail!("model config {name} has {} classes, the data has {classes}", cfg.classes);
            }
            let ranks = dense_ranks(&cfg);
            let params = init_params(&cfg, &ranks, *seed);
            Ok(HostModel { cfg, ranks, params, normalize: None, metadata: BTreeMap::new() })
        }
        ModelSource::Checkpoint { path, heads } => {
            let probe = load_model(path, *heads, None)?;
            if probe.cfg.classes == classes {
                return Ok(probe);
            }
            load_model(path, *heads, Some(classes))
        }
    }
}

/// Raw stored images → model input.
pub fn transform_for(cfg: &VitConfig, data: &Dataset, normalize: Normalize) -> Result<ImageTransform> {
    if data.channels != cfg.channels {
        bail!("the data has {} channels, the model expects {}", data.channels, cfg.channels);
    }
    normalize.transform(data, cfg.image_size)
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
pub fn choose_normalize(flag: Option<Normalize>, model: Option<Normalize>, data: &str) -> Normalize {
    flag.or(model).unwrap_or_else(|| default_normalize(data))
}

/// Metadata stored in every checkpoint a run writes.
pub fn run_metadata(role: &str, data: &str, normalize: Normalize, loss: &LossSpec) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("role".into(), role.into());
    m.insert("data".into(), data.into());
    m.insert("normalize".into(), normalize.to_string());
    m.insert("loss".into(), serde_json::to_string(loss).unwrap_or_default());
    m
}
