//! One student, from the teacher's weights to a trained checkpoint: the
//! path that `distill` and every job of `sweep` share. The student is made
//! from the teacher as its `StudentPlan` says (`factorize::make_student`;
//! `svd-act` calibrates on the run's training images, fresh tensors draw
//! from the run's seed), or comes from a student checkpoint; it is built on
//! the device with its optimizer and trained by `fit` against the teacher
//! signal the caller chose (live teacher, cached logits, or none).

use super::fit::{fit, FitOptions, FitRun, FitSummary, RunFiles, Teacher};
use super::{AdamWConfig, LossSpec, Trainer};
use crate::data::Dataset;
use crate::factorize::{make_student, CalibrationData, StudentPlan};
use crate::model::{Ranks, Vit, VitConfig, VitParams};
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use crate::options::ModelPaths;
use crate::train::fit::EpochMetadata;
use crate::train::spare_threads::SpareThreads;
use anyhow::Result;

/// Where a student's weights start.
pub enum StudentStart<'a> {
    /// The teacher factorized at `ranks` as `plan` says.
    Factorize { ranks: Ranks, plan: StudentPlan },
    /// A student checkpoint's parameters.
    Given {
        ranks: Ranks,
        params: &'a VitParams<Vec<f32>>,
    },
}

impl StudentStart<'_> {
    pub fn ranks(&self) -> &Ranks {
        match self {
            StudentStart::Factorize { ranks, .. } | StudentStart::Given { ranks, .. } => ranks,
        }
    }
}

/// Everything about one student's training but the device and the teacher signal.
pub struct StudentRun<'a> {
    pub cfg: &'a VitConfig,
    pub teacher: &'a VitParams<Vec<f32>>,
    pub start: StudentStart<'a>,
    pub train: &'a Dataset,
    pub test: &'a Dataset,
    pub transform: &'a ImageTransform,
    pub loss: &'a LossSpec,
    pub fit: &'a FitOptions,
    pub optimizer: AdamWConfig,
    pub files: &'a RunFiles,
    /// Provenance written into every checkpoint of the run.
    pub meta: &'a dyn EpochMetadata,
    /// The paths the student takes (`ComputeRecord::paths`).
    pub paths: ModelPaths,
    /// Threads a sweep's finished workers lend (None: outside a sweep).
    pub spare_threads: Option<SpareThreads>,
}

/// Factorize (or take) the student, build it on `be` and train it.
/// `on_epoch` runs after every saved epoch (the sweep's claim heartbeat).
pub fn train_student<B: Backend>(
    be: &B,
    run: &StudentRun<'_>,
    teacher: Teacher<'_, B>,
    on_epoch: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<FitSummary> {
    let params = match &run.start {
        StudentStart::Factorize { ranks, plan } => {
            let data = CalibrationData {
                train: run.train,
                transform: run.transform,
            };
            make_student(run.cfg, run.teacher, ranks, plan, run.fit.seed, Some(data))?.0
        }
        StudentStart::Given { params, .. } => (*params).clone(),
    };
    let model = Vit::from_host(be, run.cfg, run.start.ranks(), &params, run.paths)?;
    let mut trainer = Trainer::with_accumulation(
        be,
        model,
        run.fit.batch,
        run.fit.micro_batches,
        run.optimizer,
    )?;
    if let Some(spare) = &run.spare_threads {
        trainer.borrow_from(spare.clone());
    }
    fit(
        be,
        &mut trainer,
        teacher,
        FitRun {
            train: run.train,
            test: run.test,
            transform: run.transform,
            loss: run.loss,
            opts: run.fit,
        },
        run.files,
        run.meta,
        on_epoch,
    )
}
