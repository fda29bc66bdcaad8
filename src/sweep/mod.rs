//! The rank sweep (METHOD.md step 4): for each (rank, seed) of this shard,
//! factorize the teacher, distill, evaluate, and append the result durably.
//!
//! Finished jobs (found in any `results*.jsonl` of the folder) are skipped,
//! so running the same command again resumes; a job interrupted mid-way
//! resumes from its last finished epoch (`train::fit`). With a loss that
//! needs only the teacher's logits, the teacher runs once per (seed, epoch)
//! for all ranks (`TeacherLogits`), not once per rank.

pub mod jobs;

use crate::data::{Dataset, Normalize};
use crate::device::Precision;
use crate::factorize::StudentPlan;
use crate::model::params::{dense_ranks, param_count, validate_ranks};
use crate::model::{Vit, VitConfig, VitParams};
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use crate::provenance::{DataRef, FileRef, RunMeta, Training};
use crate::results::{append_record, read_records, Record, StudentRecord, TeacherRecord};
use crate::train::fit::evaluate;
use crate::train::{train_student, AdamWConfig, FitOptions, Frozen, LossSpec, RunFiles, StudentRun, StudentStart, Teacher, TeacherLogits};
use anyhow::{bail, Context, Result};
use jobs::{all_jobs, finished, host_name, try_claim, Heartbeat, Job, Shard};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// Everything a sweep needs besides the device.
pub struct SweepInputs<'a> {
    pub cfg: &'a VitConfig,
    pub teacher: &'a VitParams<Vec<f32>>,
    /// The teacher's file, by name and content (students record it).
    pub teacher_file: FileRef,
    pub train: &'a Dataset,
    pub test: &'a Dataset,
    pub normalize: Normalize,
    pub transform: ImageTransform,
    /// How the data was named and loaded, and its fingerprints.
    pub data: DataRef,
}

/// Settings of a sweep. Serialized whole into every student's record
/// (`StudentRecord::settings`) less the fields marked `skip`, which choose
/// which jobs run and where, not how a student is trained.
#[derive(Clone, Debug, Serialize)]
pub struct SweepOptions {
    #[serde(skip)]
    pub out: PathBuf,
    #[serde(skip)]
    pub ranks: Vec<usize>,
    #[serde(skip)]
    pub seeds: Vec<u64>,
    #[serde(skip)]
    pub shard: Shard,
    /// Which layers are factorized, how, and what else comes from the
    /// teacher (flattened: `init`, `targets`, `from_teacher`).
    #[serde(flatten)]
    pub plan: StudentPlan,
    pub loss: LossSpec,
    /// Training settings; `seed` and `label` are set per job.
    pub fit: FitOptions,
    pub optimizer: AdamWConfig,
    /// Reuse teacher logits across ranks (when the loss allows it).
    pub cache_teacher: bool,
    /// How often a job refreshes its claim, and when others give up on it.
    #[serde(skip)]
    pub heartbeat: Heartbeat,
    #[serde(skip)]
    pub quiet: bool,
}

/// What a sweep did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SweepSummary {
    pub jobs_in_shard: usize,
    pub trained: usize,
    pub skipped: usize,
    pub teacher_top1: f64,
    pub teacher_epochs_computed: usize,
    pub teacher_epochs_reused: usize,
    pub teacher_seconds: f64,
    pub wall_s: f64,
}

/// Check ranks and seeds before any work starts.
pub fn validate_options(cfg: &VitConfig, opts: &SweepOptions) -> Result<()> {
    if opts.ranks.is_empty() {
        bail!("no ranks to sweep: give --ranks, e.g. --ranks 2,4,8,16");
    }
    if opts.seeds.is_empty() {
        bail!("no seeds: give --seeds, e.g. --seeds 0");
    }
    for &r in &opts.ranks {
        validate_ranks(cfg, &opts.plan.targets.ranks(cfg, r)?).with_context(|| format!("--ranks contains {r}"))?;
    }
    if let Some(r) = repeated(&opts.ranks) {
        bail!("--ranks lists {r} more than once");
    }
    if let Some(s) = repeated(&opts.seeds) {
        bail!("--seeds lists {s} more than once");
    }
    Ok(())
}

/// A value that appears twice in `values`.
fn repeated<T: Ord + Copy>(values: &[T]) -> Option<T> {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// What the teacher's logits over an epoch depend on, beyond the seed and
/// the epoch (in the cache file's name): the key of the on-disk cache.
#[derive(Serialize)]
struct TeacherCacheKey<'a> {
    teacher_sha256: &'a str,
    train: &'a str,
    transform: &'a ImageTransform,
    augment: &'a crate::data::Augment,
    batch: usize,
    precision: Precision,
}

/// Run this shard's part of the sweep.
pub fn run_sweep<B: Backend>(be: &B, inputs: &SweepInputs<'_>, opts: &SweepOptions) -> Result<SweepSummary> {
    let started = std::time::Instant::now();
    let cfg = inputs.cfg;
    validate_options(cfg, opts)?;
    crate::io::create_folder(&opts.out)?;
    let results_file = opts.shard.results_file(&opts.out);
    let dense = dense_ranks(cfg);
    let teacher_params = param_count(cfg, &dense);
    let batch = opts.fit.batch;

    // The teacher's own accuracy, once per results folder.
    let mut teacher = Frozen::new(be, Vit::from_host(be, cfg, &dense, inputs.teacher)?, batch)?;
    let known = read_records(&opts.out)?.into_iter().find_map(|r| match r {
        Record::Teacher(t) => Some(t),
        _ => None,
    });
    let teacher_top1 = match known {
        Some(t) => t.top1,
        None => {
            let (top1, top5) = evaluate(inputs.test, batch, cfg.classes, |bytes, n| teacher.logits(be, bytes, n, &inputs.transform))?;
            append_record(&results_file, &Record::Teacher(TeacherRecord { top1, top5, params: teacher_params }))?;
            top1
        }
    };
    if !opts.quiet {
        eprintln!("teacher: {:.2}% top-1, {teacher_params} parameters", 100.0 * teacher_top1);
    }

    let mine = opts.shard.select(&all_jobs(&opts.ranks, &opts.seeds));
    let done = finished(&opts.out)?;
    let todo: Vec<Job> = mine.iter().copied().filter(|j| !done.contains_key(j)).collect();
    if !opts.quiet && todo.len() < mine.len() {
        eprintln!("{} of {} jobs of this shard already finished; skipping them", mine.len() - todo.len(), mine.len());
    }

    let use_cache = opts.cache_teacher && opts.loss.needs_teacher() && !opts.loss.needs_features();
    let cache_key = serde_json::to_string(&TeacherCacheKey {
        teacher_sha256: &inputs.teacher_file.sha256,
        train: &inputs.data.train,
        transform: &inputs.transform,
        augment: &opts.fit.augment,
        batch,
        precision: be.precision(),
    })?;
    let mut caches: HashMap<u64, TeacherLogits<B>> = HashMap::new();
    let mut live: Option<Frozen<B>> = if opts.loss.needs_teacher() && !use_cache { Some(teacher) } else { None };
    let mut skipped_claimed = 0;
    for job in &todo {
        let job_start = std::time::Instant::now();
        let claim = match try_claim(&opts.out, *job, opts.heartbeat)? {
            Ok(claim) => claim,
            Err(other) => {
                eprintln!(
                    "rank {} seed {} is being trained by {} (pid {}, heartbeat every {} s); skipping it here (it is taken over once it misses {} beats or its process is gone)",
                    job.rank, job.seed, other.host, other.pid, other.heartbeat.every_s, other.heartbeat.stale_after_beats
                );
                skipped_claimed += 1;
                continue;
            }
        };
        // Another process may have finished it since this one listed the work.
        if finished(&opts.out)?.contains_key(job) {
            claim.release();
            skipped_claimed += 1;
            continue;
        }
        let ranks = opts.plan.targets.ranks(cfg, job.rank)?;
        let plan = StudentPlan { init: opts.plan.init.with_seed(job.seed), ..opts.plan };
        let fit_opts = FitOptions { seed: job.seed, label: format!("rank {}", job.rank), ..opts.fit.clone() };
        let teacher_signal = if use_cache {
            if let std::collections::hash_map::Entry::Vacant(e) = caches.entry(job.seed) {
                let t = Frozen::new(be, Vit::from_host(be, cfg, &dense, inputs.teacher)?, batch)?;
                e.insert(TeacherLogits::new(t, inputs.transform, fit_opts.augment, job.seed, batch, Some(opts.out.join("cache")), &cache_key));
            }
            Teacher::Cached(caches.get_mut(&job.seed).expect("inserted above"))
        } else if let Some(t) = live.as_mut() {
            Teacher::Live(t)
        } else {
            Teacher::None
        };
        let job_opts = SweepOptions { fit: fit_opts.clone(), plan, ..opts.clone() };
        let meta = student_meta(inputs, &job_opts);
        let files = RunFiles::new(&job.dir(&opts.out));
        warn_if_resumed_on_other_data(&files, &inputs.data, *job);
        let run = StudentRun {
            cfg,
            teacher: inputs.teacher,
            start: StudentStart::Factorize { ranks: ranks.clone(), plan },
            train: inputs.train,
            test: inputs.test,
            transform: &inputs.transform,
            loss: &opts.loss,
            fit: &fit_opts,
            optimizer: opts.optimizer,
            files: &files,
            meta: &meta,
        };
        let mut heartbeat = |epoch: usize| claim.epoch_done(epoch, opts.heartbeat);
        let summary = train_student(be, &run, teacher_signal, &mut heartbeat).with_context(|| format!("training rank {} seed {}", job.rank, job.seed))?;
        let params = param_count(cfg, &ranks);
        let record = StudentRecord {
            rank: job.rank,
            seed: job.seed,
            top1: summary.test_top1,
            top5: summary.test_top5,
            params,
            teacher_params,
            compression: teacher_params as f64 / params as f64,
            epochs: fit_opts.epochs,
            wall_s: job_start.elapsed().as_secs_f64(),
            host: host_name(),
            settings: serde_json::to_value(&job_opts)?,
            resumed_from_epoch: summary.resumed_from_epoch,
        };
        append_record(&results_file, &Record::Student(record))?;
        claim.release();
        if !opts.quiet {
            eprintln!(
                "rank {:>4} seed {}: {:.2}% top-1 ({:.1}% of the teacher), {:.1}x fewer parameters, {:.1} s",
                job.rank,
                job.seed,
                100.0 * summary.test_top1,
                100.0 * summary.test_top1 / teacher_top1.max(1e-12),
                teacher_params as f64 / params as f64,
                job_start.elapsed().as_secs_f64()
            );
        }
    }

    let (computed, reused, seconds) = caches.values().fold((0, 0, 0.0), |(c, r, s), t| (c + t.epochs_computed, r + t.epochs_reused, s + t.teacher_seconds));
    Ok(SweepSummary {
        jobs_in_shard: mine.len(),
        trained: todo.len() - skipped_claimed,
        skipped: mine.len() - todo.len() + skipped_claimed,
        teacher_top1,
        teacher_epochs_computed: computed,
        teacher_epochs_reused: reused,
        teacher_seconds: seconds,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// A warning when a job about to resume was started on other data.
fn warn_if_resumed_on_other_data(files: &RunFiles, data: &DataRef, job: Job) {
    if !files.state().is_file() {
        return;
    }
    let recorded = crate::model::checkpoint::read_metadata(&files.model()).ok().and_then(|m| RunMeta::from_metadata(&m, &files.model()).ok().flatten()).and_then(|r| r.data);
    if let Some(recorded) = recorded {
        let d = recorded.differences(data);
        if !d.is_empty() {
            eprintln!("warning: rank {} seed {} resumes a run started on other data ({}); delete {} to start it again", job.rank, job.seed, d.join(", "), files.dir.display());
        }
    }
}

/// The provenance of one job's student.
fn student_meta(inputs: &SweepInputs<'_>, job: &SweepOptions) -> RunMeta {
    let training = Training { data: &inputs.data, loss: &job.loss, fit: &job.fit, optimizer: job.optimizer };
    RunMeta::student(inputs.normalize, inputs.transform.resize, inputs.teacher_file.clone(), Some(&job.plan), Some(training))
}
