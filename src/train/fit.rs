//! The epoch loop shared by `train`, `distill` and every rank of `sweep`.
//!
//! Per epoch: a seeded order of the training set, augmented batches (seeded
//! by (seed, epoch, index); a streamed data set's decoded ahead on a pool
//! of threads, `data::for_each_batch`), one `Trainer::step` per batch with the
//! scheduled learning rate, then top-1/top-5 on the test set. After every
//! epoch the model and optimizer state go to disk atomically
//! (`model.safetensors`, `state.safetensors`) and a JSON line to
//! `metrics.jsonl`, so an interrupted run (Ctrl-C, kill, crash) resumes at
//! the next epoch with the same numbers it would have produced.

use super::state::{load_train_state, save_train_state};
use super::step::{count_correct, count_top_k, Batch, Frozen, TeacherSignal, Trainer};
use super::teacher_cache::TeacherLogits;
use super::{CosineSchedule, LossSpec};
use crate::data::{epoch_order, for_each_batch, Augment, BatchPass, Dataset};
use crate::durable::{append_line, read_jsonl};
use crate::model::checkpoint::save_checkpoint;
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Set by the Ctrl-C handler; the loop stops at the next batch boundary.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Install the Ctrl-C handler once per process.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: stopping at the end of this batch; run the same command again to resume");
        });
    });
}

/// Settings of one training run (serialized into provenance and results
/// records, less how it is shown).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitOptions {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_epochs: f32,
    pub seed: u64,
    pub augment: Augment,
    /// Evaluate on the test set after every epoch (else only after the last).
    pub eval_every_epoch: bool,
    /// Micro-batches per optimizer step (gradient accumulation; 1: none).
    /// Left out of records when 1, so records of runs without it keep
    /// their form.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub micro_batches: usize,
    #[serde(skip)]
    pub quiet: bool,
    /// Label for the progress bar ("teacher", "rank 16").
    #[serde(skip)]
    pub label: String,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

/// One epoch's numbers, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub loss: f64,
    pub train_top1: f64,
    pub test_top1: Option<f64>,
    pub test_top5: Option<f64>,
    pub images_per_s: f64,
    pub lr: f32,
    /// The process's peak resident memory so far, in bytes
    /// (`memory::peak_resident_bytes`; none where it cannot be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_host_bytes: Option<u64>,
}

/// The outcome of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FitSummary {
    pub epochs: usize,
    pub test_top1: f64,
    pub test_top5: f64,
    pub wall_s: f64,
    pub resumed_from_epoch: usize,
    /// The process's peak resident memory at the end, in bytes.
    pub peak_host_bytes: Option<u64>,
    pub history: Vec<EpochMetrics>,
}

/// Where the teacher signal of a run comes from.
pub enum Teacher<'a, B: Backend> {
    None,
    /// Run the teacher every step (the feature loss needs its activations).
    Live(&'a mut Frozen<B>),
    /// Per-epoch teacher logits, computed once and shared by every rank
    /// (behind a lock: students trained at once share one cache).
    Cached(&'a Mutex<TeacherLogits<B>>),
}

/// Files of a run in its output folder.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn new(dir: &Path) -> Self {
        RunFiles {
            dir: dir.to_path_buf(),
        }
    }
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    /// Where the last finished epoch is, for an error message: the
    /// checkpoint when there is one, else that none has been saved yet.
    pub fn last_checkpoint(&self) -> String {
        if self.model().is_file() {
            format!("the last good checkpoint is {}", self.model().display())
        } else {
            format!("no checkpoint has been saved yet in {}", self.dir.display())
        }
    }
}

/// Test-set top-1 and top-5 (fractions), from `logits_of(bytes, n)`
/// applied to un-augmented batches of at most `batch` images (a streamed
/// test set is decoded ahead, as in training).
pub fn evaluate(
    test: &Dataset,
    batch: usize,
    classes: usize,
    mut logits_of: impl FnMut(&[u8], usize) -> Result<Vec<f32>>,
) -> Result<(f64, f64)> {
    let (mut top1, mut top5) = (0usize, 0usize);
    let indices: Vec<usize> = (0..test.len()).collect();
    let pass = BatchPass {
        ds: test,
        order: &indices,
        batch: batch.max(1),
        aug: &Augment::NONE,
        seed: 0,
        epoch: 0,
    };
    for_each_batch(pass, |_, bytes, labels| {
        let logits = logits_of(bytes, labels.len())?;
        top1 += count_correct(&logits, labels, classes);
        top5 += count_top_k(&logits, labels, classes, 5.min(classes));
        Ok(())
    })?;
    let n = test.len().max(1) as f64;
    Ok((top1 as f64 / n, top5 as f64 / n))
}

/// Every progress bar of the process, so that students trained at once
/// each get a line of their own.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Print a line above the progress bars.
fn report(line: &str) {
    bars().suspend(|| eprintln!("{line}"));
}

fn progress_bar(quiet: bool, len: u64, label: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = bars().add(ProgressBar::new(len));
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// What a training run trains on and how: the training and test sets, the
/// transform that makes their images the model's input, the loss and the
/// run's options.
#[derive(Clone, Copy)]
pub struct FitRun<'a> {
    pub train: &'a Dataset,
    pub test: &'a Dataset,
    pub transform: &'a ImageTransform,
    pub loss: &'a LossSpec,
    pub opts: &'a FitOptions,
}

/// What a run writes into each of its model checkpoints' metadata after an
/// epoch (`provenance::RunMeta`: the run's description, with the epoch and
/// its metrics).
pub trait EpochMetadata {
    fn after_epoch(&self, epoch: usize, metrics: &EpochMetrics)
        -> Result<BTreeMap<String, String>>;
}

/// Train `trainer` on `run.train` for `run.opts.epochs` epochs, writing
/// checkpoints and metrics into `files.dir` and resuming from them when
/// present. `meta` is stored in every model checkpoint, with the epoch and
/// its metrics; `on_epoch` is called with the number of finished epochs
/// after each one is saved.
pub fn fit<B: Backend>(
    be: &B,
    trainer: &mut Trainer<B>,
    mut teacher: Teacher<'_, B>,
    run: FitRun<'_>,
    files: &RunFiles,
    meta: &dyn EpochMetadata,
    on_epoch: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<FitSummary> {
    let FitRun {
        train,
        test,
        transform,
        loss,
        opts,
    } = run;
    install_interrupt_handler();
    if opts.batch == 0 || opts.batch > trainer.max_batch() {
        bail!("batch {} outside 1..={}", opts.batch, trainer.max_batch());
    }
    if train.is_empty() {
        bail!("the training set is empty");
    }
    crate::durable::create_folder(&files.dir)?;
    let steps_per_epoch = train.len().div_ceil(opts.batch);
    let schedule = CosineSchedule {
        base_lr: opts.lr,
        min_lr: opts.min_lr,
        warmup_steps: (opts.warmup_epochs * steps_per_epoch as f32).round() as usize,
        total_steps: opts.epochs * steps_per_epoch,
    };

    let mut start_epoch = 0;
    if files.state().exists() {
        start_epoch = load_train_state(be, &files.state(), trainer)
            .with_context(|| format!("resuming from {}", files.state().display()))?;
        if !opts.quiet {
            report(&format!(
                "{}: resuming after epoch {start_epoch} from {}",
                opts.label,
                files.dir.display()
            ));
        }
    }
    let mut history = resumed_history(&files.metrics(), start_epoch)?;

    let started = Instant::now();
    let classes = trainer.model.cfg.classes;
    for epoch in start_epoch..opts.epochs {
        let order = epoch_order(train.len(), opts.seed, epoch as u64);
        let epoch_logits = match &mut teacher {
            // A copy (n x classes floats) so the cache is free again for the steps.
            Teacher::Cached(cache) => Some(
                cache
                    .lock()
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "the teacher-logit cache lock is poisoned (another student failed)"
                        )
                    })?
                    .epoch(be, train, &order, epoch as u64)?
                    .to_vec(),
            ),
            _ => None,
        };
        let pb = progress_bar(
            opts.quiet,
            steps_per_epoch as u64,
            &format!("{} e{}/{}", opts.label, epoch + 1, opts.epochs),
        );
        let epoch_start = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = opts.lr;
        let pass = BatchPass {
            ds: train,
            order: &order,
            batch: opts.batch,
            aug: &opts.augment,
            seed: opts.seed,
            epoch: epoch as u64,
        };
        for_each_batch(pass, |b, bytes, labels| {
            if INTERRUPTED.load(Ordering::SeqCst) {
                pb.abandon();
                bail!(
                    "interrupted during epoch {} of {}; {}",
                    epoch + 1,
                    opts.label,
                    files.last_checkpoint()
                );
            }
            let signal = match (&mut teacher, &epoch_logits) {
                (Teacher::None, _) => TeacherSignal::None,
                (Teacher::Live(t), _) => TeacherSignal::Live(t),
                (Teacher::Cached(_), Some(all)) => {
                    let from = b * opts.batch * classes;
                    TeacherSignal::Cached(&all[from..from + labels.len() * classes])
                }
                (Teacher::Cached(_), None) => unreachable!("cached logits are computed above"),
            };
            lr = schedule.lr(epoch * steps_per_epoch + b);
            let stats = trainer
                .step(
                    be,
                    Batch {
                        bytes,
                        labels,
                        transform,
                    },
                    signal,
                    loss,
                    lr,
                )
                .with_context(|| {
                    format!(
                        "{}: epoch {}, batch {}; {}",
                        opts.label,
                        epoch + 1,
                        b + 1,
                        files.last_checkpoint()
                    )
                })?;
            loss_sum += stats.loss as f64 * labels.len() as f64;
            correct += stats.correct;
            seen += labels.len();
            pb.set_message(format!("loss {:.4}", loss_sum / seen as f64));
            pb.inc(1);
            Ok(())
        })?;
        pb.finish_and_clear();
        let images_per_s = seen as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9);
        let last = epoch + 1 == opts.epochs;
        let (test_top1, test_top5) = if opts.eval_every_epoch || last {
            let (t1, t5) = evaluate(test, opts.batch, classes, |bytes, n| {
                trainer.logits(be, bytes, n, transform)
            })?;
            (Some(t1), Some(t5))
        } else {
            (None, None)
        };
        let m = EpochMetrics {
            epoch: epoch + 1,
            loss: loss_sum / seen as f64,
            train_top1: correct as f64 / seen as f64,
            test_top1,
            test_top5,
            images_per_s,
            lr,
            peak_host_bytes: crate::memory::peak_resident_bytes(),
        };
        save_checkpoint(
            &files.model(),
            &trainer.model.cfg,
            &trainer.model.ranks,
            &trainer.model.to_host(be)?,
            &meta.after_epoch(epoch + 1, &m)?,
        )?;
        append_line(&files.metrics(), &serde_json::to_string(&m)?)?;
        // The training state is the commit point of an epoch: a crash before
        // it is written redoes the epoch (with the same numbers), and the
        // metrics line it left is dropped on resume.
        save_train_state(be, &files.state(), trainer, epoch + 1)?;
        on_epoch(epoch + 1)?;
        if !opts.quiet {
            let test = test_top1
                .map(|t| format!(", test top-1 {:.2}%", 100.0 * t))
                .unwrap_or_default();
            report(&format!(
                "{} epoch {}/{}: loss {:.4}, train top-1 {:.2}%{test}, {:.0} images/s",
                opts.label,
                epoch + 1,
                opts.epochs,
                m.loss,
                100.0 * m.train_top1,
                images_per_s
            ));
        }
        history.push(m);
    }

    let (test_top1, test_top5) = match history.last() {
        Some(EpochMetrics {
            test_top1: Some(t1),
            test_top5: Some(t5),
            ..
        }) => (*t1, *t5),
        _ => evaluate(test, opts.batch, classes, |bytes, n| {
            trainer.logits(be, bytes, n, transform)
        })?,
    };
    Ok(FitSummary {
        epochs: opts.epochs,
        test_top1,
        test_top5,
        wall_s: started.elapsed().as_secs_f64(),
        resumed_from_epoch: start_epoch,
        peak_host_bytes: crate::memory::peak_resident_bytes(),
        history,
    })
}

/// The metrics of the epochs an interrupted run finished (up to
/// `start_epoch`, the last one of each epoch), with `metrics.jsonl`
/// rewritten to exactly those when it held more (an epoch whose state was
/// never committed, see `fit`).
fn resumed_history(path: &Path, start_epoch: usize) -> Result<Vec<EpochMetrics>> {
    let on_disk = read_history(path)?;
    let mut by_epoch = std::collections::BTreeMap::new();
    for m in on_disk.iter().filter(|m| m.epoch <= start_epoch) {
        by_epoch.insert(m.epoch, m.clone());
    }
    let kept: Vec<EpochMetrics> = by_epoch.into_values().collect();
    if kept.len() != on_disk.len() {
        let mut text = String::new();
        for m in &kept {
            text.push_str(&serde_json::to_string(m)?);
            text.push('\n');
        }
        crate::durable::atomic_write(path, text.as_bytes())?;
    }
    Ok(kept)
}

/// The metrics already written by an earlier (interrupted) run.
pub fn read_history(path: &Path) -> Result<Vec<EpochMetrics>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    read_jsonl(path, "a metrics record")
}
