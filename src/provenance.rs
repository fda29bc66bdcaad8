//! Provenance: what a checkpoint needs to be evaluated again exactly as the
//! run that wrote it evaluated it, and where it came from.
//!
//! `RunMeta` is written by every command that writes a checkpoint (`train`,
//! `factorize`, `distill`, `sweep` and its adaptive students) into the
//! checkpoint's safetensors metadata under the key `run` (JSON), and read
//! back by `eval`, `distill` and `sweep`: the normalization and the way the
//! data was loaded become the defaults, so `eval` of a checkpoint
//! reproduces the accuracy its run recorded; the data fingerprints and the
//! teacher's content hash let a later command warn when it is given other
//! data or another teacher.

use crate::data::{Dataset, Normalize};
use crate::factorize::budget::AllocationRecord;
use crate::factorize::{FactorInit, FromTeacher, StudentPlan, Targets};
use crate::options::ComputeRecord;
use crate::train::{AdamWConfig, EpochMetrics, FitOptions, LossSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Checkpoint metadata key of the `RunMeta` JSON.
pub const RUN_KEY: &str = "run";

/// What a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Teacher,
    Student,
}

/// A file by the name it was given and its content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: String,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
}

impl FileRef {
    /// Hash `path` (reads the whole file); a hub folder hashes its
    /// config.json, then its weights file.
    pub fn of(path: &Path) -> Result<FileRef> {
        use sha2::{Digest, Sha256};
        let files = if path.is_dir() {
            let (weights, config) = crate::model::import::hub_folder_files(path)?;
            vec![config, weights]
        } else {
            vec![path.to_path_buf()]
        };
        let mut h = Sha256::new();
        for file in files {
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", file.display()))?;
        }
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(FileRef {
            path: path.display().to_string(),
            sha256,
        })
    }
}

/// The data a run saw: how it was named and loaded, and the fingerprint of
/// each split (`Dataset::fingerprint`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRef {
    /// The `--data` value: `demo`, a CIFAR folder (binary or python), a
    /// parquet folder or an image-folder root.
    pub source: String,
    /// Side of the stored images (an image folder's or parquet data's:
    /// `--image-size`, else the model's need, `cli::setup::DataFlags::choose`).
    pub image_size: usize,
    /// Why `image_size` is what it is: "model input size", "--resize",
    /// "--image-size", "recorded by the run", or "stored by the source"
    /// (demo, CIFAR: not resized at load). Absent from files written
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size_from: Option<String>,
    /// Training images of the demo data (`--demo-images`).
    pub demo_images: usize,
    /// The image and label columns of parquet data as `--image-column` and
    /// `--label-column` named them (absent: detected, or not parquet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
    pub train: String,
    pub test: String,
}

impl DataRef {
    pub fn new(
        source: &str,
        image_size: usize,
        demo_images: usize,
        train: &Dataset,
        test: &Dataset,
    ) -> Self {
        DataRef {
            source: source.to_string(),
            image_size,
            image_size_from: None,
            demo_images,
            image_column: None,
            label_column: None,
            train: train.fingerprint(),
            test: test.fingerprint(),
        }
    }

    /// The ways `other` differs from this data (empty when they agree), for warnings.
    pub fn differences(&self, other: &DataRef) -> Vec<String> {
        let mut d = Vec::new();
        if self.train != other.train {
            d.push(format!(
                "training split {} instead of {}",
                other.train, self.train
            ));
        }
        if self.test != other.test {
            d.push(format!(
                "test split {} instead of {}",
                other.test, self.test
            ));
        }
        d
    }
}

/// Everything needed to evaluate a checkpoint again, and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub role: Role,
    /// The per-channel normalization the model was trained and evaluated with.
    pub normalize: Normalize,
    /// The intermediate resize before the center crop to the input size
    /// (`--resize`; None: straight to the input size). Absent from files
    /// that did not use one, and from files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<usize>,
    /// The data it was trained on (None: not trained by the engine, e.g. a
    /// factorized student of an imported teacher).
    pub data: Option<DataRef>,
    /// The training objective (None: not trained).
    pub loss: Option<LossSpec>,
    /// The teacher a student was factorized from or distilled against.
    pub teacher: Option<FileRef>,
    /// How a student's factors started.
    pub factor_init: Option<FactorInit>,
    /// Which layers of which blocks a student factorized (`--layers`,
    /// `--blocks`; None: a teacher, a student from a checkpoint, or a file
    /// written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// What a factorized student took from its teacher besides the factors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_teacher: Option<FromTeacher>,
    /// How a budget student's per-layer ranks were chosen (`factorize
    /// --budget`; None: one rank for every layer, or not a student).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<AllocationRecord>,
    /// The training settings (None for a checkpoint that was not trained).
    pub fit: Option<FitOptions>,
    pub optimizer: Option<AdamWConfig>,
    /// What computed the training: the engine version and commit, the
    /// device, the precision, the options given and the paths they took
    /// (None: not trained, or a file written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ComputeRecord>,
    /// How the imported checkpoint it came from was read: the naming, the
    /// config.json, where the heads came from (guessed or said), the input
    /// size resampling, the class names (None: not from an import).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<crate::model::import::ImportRecord>,
    /// Finished epochs when the checkpoint was written (None: not trained).
    pub epoch: Option<usize>,
    /// That epoch's numbers, among them the test accuracy the run recorded.
    pub metrics: Option<EpochMetrics>,
}

/// The training a checkpoint came from: its data, objective and settings.
#[derive(Clone, Copy, Debug)]
pub struct Training<'a> {
    pub data: &'a DataRef,
    pub loss: &'a LossSpec,
    pub fit: &'a FitOptions,
    pub optimizer: AdamWConfig,
    /// What computed it: engine, device, precision, options and paths.
    pub compute: &'a ComputeRecord,
}

impl RunMeta {
    /// A teacher trained with `training` on inputs normalized with
    /// `normalize` (through `resize` and a center crop when given).
    pub fn teacher(normalize: Normalize, resize: Option<usize>, training: Training<'_>) -> RunMeta {
        RunMeta {
            role: Role::Teacher,
            normalize,
            resize,
            data: Some(training.data.clone()),
            loss: Some(*training.loss),
            teacher: None,
            factor_init: None,
            targets: None,
            from_teacher: None,
            allocation: None,
            fit: Some(training.fit.clone()),
            optimizer: Some(training.optimizer),
            compute: Some(training.compute.clone()),
            import: None,
            epoch: None,
            metrics: None,
        }
    }

    /// A student of `teacher`, made as `plan` says (None: it came from a
    /// student checkpoint), trained with `training` (None: not yet).
    pub fn student(
        normalize: Normalize,
        resize: Option<usize>,
        teacher: FileRef,
        plan: Option<&StudentPlan>,
        training: Option<Training<'_>>,
    ) -> RunMeta {
        RunMeta {
            role: Role::Student,
            normalize,
            resize,
            data: training.map(|t| t.data.clone()),
            loss: training.map(|t| *t.loss),
            teacher: Some(teacher),
            factor_init: plan.map(|p| p.init),
            targets: plan.map(|p| p.targets),
            from_teacher: plan.map(|p| p.from_teacher),
            allocation: None,
            fit: training.map(|t| t.fit.clone()),
            optimizer: training.map(|t| t.optimizer),
            compute: training.map(|t| t.compute.clone()),
            import: None,
            epoch: None,
            metrics: None,
        }
    }

    /// The checkpoint metadata that carries this (`run` → JSON).
    pub fn metadata(&self) -> Result<BTreeMap<String, String>> {
        Ok(BTreeMap::from([(
            RUN_KEY.to_string(),
            serde_json::to_string(self)?,
        )]))
    }

    /// The `RunMeta` of a checkpoint's metadata: `None` for files the engine
    /// did not write (timm, torchvision, Hugging Face) or wrote before it
    /// recorded one; an error naming the file when it is there but unreadable.
    pub fn from_metadata(
        metadata: &BTreeMap<String, String>,
        path: &Path,
    ) -> Result<Option<RunMeta>> {
        match metadata.get(RUN_KEY) {
            None => Ok(None),
            Some(text) => serde_json::from_str(text).map(Some).with_context(|| {
                format!(
                    "{}: metadata '{RUN_KEY}' is not a run description",
                    path.display()
                )
            }),
        }
    }

    /// This run after `epoch` finished epochs with `metrics`.
    pub fn after_epoch(&self, epoch: usize, metrics: &EpochMetrics) -> RunMeta {
        RunMeta {
            epoch: Some(epoch),
            metrics: Some(metrics.clone()),
            ..self.clone()
        }
    }

    /// The test top-1 the run recorded, when its last epoch was evaluated.
    pub fn recorded_top1(&self) -> Option<f64> {
        self.metrics.as_ref().and_then(|m| m.test_top1)
    }
}

impl crate::train::fit::EpochMetadata for RunMeta {
    fn after_epoch(
        &self,
        epoch: usize,
        metrics: &EpochMetrics,
    ) -> Result<BTreeMap<String, String>> {
        RunMeta::after_epoch(self, epoch, metrics).metadata()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(train: &str) -> DataRef {
        DataRef {
            source: "demo".into(),
            image_size: 32,
            image_size_from: None,
            demo_images: 4000,
            image_column: None,
            label_column: None,
            train: train.into(),
            test: "t".into(),
        }
    }

    #[test]
    fn round_trips_through_checkpoint_metadata() {
        let fit = FitOptions {
            epochs: 2,
            batch: 8,
            lr: 1e-3,
            min_lr: 0.0,
            warmup_epochs: 0.0,
            seed: 1,
            augment: crate::data::Augment::NONE,
            eval_every_epoch: true,
            micro_batches: 1,
            quiet: true,
            label: "x".into(),
        };
        let d = data("a");
        let compute = ComputeRecord::for_device(&Default::default(), &crate::device::Cpu);
        let training = Training {
            data: &d,
            loss: &LossSpec::ce(),
            fit: &fit,
            optimizer: AdamWConfig::default(),
            compute: &compute,
        };
        let teacher = FileRef {
            path: "t.safetensors".into(),
            sha256: "00".into(),
        };
        let plan = StudentPlan {
            init: FactorInit::Random { seed: 3 },
            targets: Targets {
                layers: "mlp".parse().unwrap(),
                blocks: Some("1-2".parse().unwrap()),
            },
            from_teacher: FromTeacher::Embeddings,
        };
        let meta = RunMeta::student(
            Normalize::Imagenet,
            Some(256),
            teacher,
            Some(&plan),
            Some(training),
        );
        assert_eq!(meta.fit.as_ref().unwrap().label, "x");
        let map = meta.metadata().unwrap();
        let back = RunMeta::from_metadata(&map, Path::new("x"))
            .unwrap()
            .unwrap();
        // How a run is shown (its label) is not part of its provenance.
        assert_eq!(back.fit.as_ref().unwrap().label, "");
        assert_eq!(
            RunMeta {
                fit: meta.fit.clone().map(|f| FitOptions {
                    label: String::new(),
                    quiet: false,
                    ..f
                }),
                ..meta
            },
            back
        );
        assert_eq!(back.targets.unwrap().to_string(), "mlp in blocks 1-2");
        assert_eq!(
            (back.resize, back.from_teacher),
            (Some(256), Some(FromTeacher::Embeddings))
        );
        let teacher_meta = RunMeta::teacher(Normalize::Half, None, training);
        assert_eq!(teacher_meta.role, Role::Teacher);
        // Fields a run did not use are left out, so older readers and files agree.
        let text = &teacher_meta.metadata().unwrap()[RUN_KEY];
        assert!(
            !text.contains("resize") && !text.contains("targets") && !text.contains("from_teacher"),
            "{text}"
        );
        assert_eq!(
            RunMeta::from_metadata(&BTreeMap::new(), Path::new("x")).unwrap(),
            None
        );
        let bad = BTreeMap::from([(RUN_KEY.to_string(), "{".to_string())]);
        assert!(format!(
            "{:#}",
            RunMeta::from_metadata(&bad, Path::new("m.safetensors")).unwrap_err()
        )
        .contains("m.safetensors"));
    }

    #[test]
    fn data_differences_name_the_split() {
        assert!(data("a").differences(&data("a")).is_empty());
        let d = data("a").differences(&data("b"));
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("training split b instead of a"), "{d:?}");
    }

    #[test]
    fn file_hashes_are_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            FileRef::of(&p).unwrap().sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
