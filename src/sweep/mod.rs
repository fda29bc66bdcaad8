//! The rank sweep (METHOD.md step 4): for each (rank, seed) of this shard,
//! factorize the teacher, distill, evaluate, and append the result durably.
//!
//! Finished jobs (found in any `results*.jsonl` of the folder) are skipped,
//! so running the same command again resumes; a job interrupted mid-way
//! resumes from its last finished epoch (`train::fit`). With a loss that
//! needs only the teacher's logits, the teacher runs once per (seed, epoch)
//! for all ranks (`TeacherLogits`), not once per rank.

pub mod jobs;

use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use crate::data::Dataset;
use crate::factorize::{factorize, FactorInit};
use crate::model::params::{dense_ranks, param_count, uniform_ranks, validate_ranks};
use crate::model::{Vit, VitConfig, VitParams};
use crate::train::fit::evaluate;
use crate::train::{fit, AdamWConfig, FitOptions, Frozen, Learner, LossSpec, RunFiles, Teacher, TeacherLogits};
use anyhow::{bail, Context, Result};
use jobs::{all_jobs, append_record, clear_claim, finished, host_name, read_records, refresh_claim, try_claim, Job, Record, Shard, StudentRecord, TeacherRecord};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Everything a sweep needs besides the backend.
pub struct SweepInputs<'a> {
    pub cfg: &'a VitConfig,
    pub teacher: &'a VitParams<Vec<f32>>,
    pub train: &'a Dataset,
    pub test: &'a Dataset,
    pub transform: ImageTransform,
    /// Identifies teacher, data and preprocessing for the logit cache.
    pub cache_key: String,
}

/// Settings of a sweep.
#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub out: PathBuf,
    pub ranks: Vec<usize>,
    pub seeds: Vec<u64>,
    pub shard: Shard,
    pub init: FactorInit,
    pub loss: LossSpec,
    /// Training settings; `seed` and `label` are set per job.
    pub fit: FitOptions,
    pub optimizer: AdamWConfig,
    /// Reuse teacher logits across ranks (when the loss allows it).
    pub cache_teacher: bool,
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
        validate_ranks(cfg, &uniform_ranks(cfg, r)).with_context(|| format!("--ranks contains {r}"))?;
    }
    Ok(())
}

/// Run this shard's part of the sweep.
pub fn run_sweep<B: Backend>(be: &B, inputs: &SweepInputs<'_>, opts: &SweepOptions) -> Result<SweepSummary> {
    let started = std::time::Instant::now();
    let cfg = inputs.cfg;
    validate_options(cfg, opts)?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
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
    let mut caches: HashMap<u64, TeacherLogits<B>> = HashMap::new();
    let mut live: Option<Frozen<B>> = if opts.loss.needs_teacher() && !use_cache { Some(teacher) } else { None };
    let mut skipped_claimed = 0;
    for job in &todo {
        let job_start = std::time::Instant::now();
        if let Some(other) = try_claim(&opts.out, *job)? {
            eprintln!(
                "rank {} seed {} is being trained by {} (pid {}); skipping it here. If that process is dead, delete {}",
                job.rank,
                job.seed,
                other.host,
                other.pid,
                job.dir(&opts.out).join("running.json").display()
            );
            skipped_claimed += 1;
            continue;
        }
        // Another process may have finished it since this one listed the work.
        if finished(&opts.out)?.contains_key(job) {
            clear_claim(&opts.out, *job);
            skipped_claimed += 1;
            continue;
        }
        let ranks = uniform_ranks(cfg, job.rank);
        let init = match opts.init {
            FactorInit::Svd => FactorInit::Svd,
            FactorInit::Random { .. } => FactorInit::Random { seed: job.seed },
        };
        let (student, _) = factorize(cfg, inputs.teacher, &ranks, init).with_context(|| format!("factorizing at rank {}", job.rank))?;
        let model = Vit::from_host(be, cfg, &ranks, &student)?;
        let mut learner = Learner::new(be, model, batch, opts.optimizer)?;
        let mut fit_opts = opts.fit.clone();
        fit_opts.seed = job.seed;
        fit_opts.label = format!("rank {}", job.rank);
        let teacher_signal = if use_cache {
            if let std::collections::hash_map::Entry::Vacant(e) = caches.entry(job.seed) {
                let t = Frozen::new(be, Vit::from_host(be, cfg, &dense, inputs.teacher)?, batch)?;
                let cache = TeacherLogits::new(t, inputs.transform, fit_opts.augment, job.seed, batch, Some(opts.out.join("cache")), &inputs.cache_key);
                e.insert(cache);
            }
            Teacher::Cached(caches.get_mut(&job.seed).expect("inserted above"))
        } else if let Some(t) = live.as_mut() {
            Teacher::Live(t)
        } else {
            Teacher::None
        };
        let mut meta = BTreeMap::new();
        meta.insert("role".to_string(), "student".to_string());
        meta.insert("loss".to_string(), serde_json::to_string(&opts.loss)?);
        let files = RunFiles::new(&job.dir(&opts.out));
        let mut heartbeat = |epoch: usize| refresh_claim(&opts.out, *job, epoch);
        let summary = fit(be, &mut learner, teacher_signal, inputs.train, inputs.test, &inputs.transform, &opts.loss, &fit_opts, &files, &meta, &mut heartbeat)
            .with_context(|| format!("training rank {} seed {}", job.rank, job.seed))?;
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
            settings: serde_json::json!({
                "loss": opts.loss,
                "init": format!("{:?}", opts.init),
                "lr": fit_opts.lr,
                "min_lr": fit_opts.min_lr,
                "batch": fit_opts.batch,
                "warmup_epochs": fit_opts.warmup_epochs,
                "flip": fit_opts.augment.flip,
                "crop_padding": fit_opts.augment.pad,
                "weight_decay": opts.optimizer.weight_decay,
                "resumed_from_epoch": summary.resumed_from_epoch,
            }),
        };
        append_record(&results_file, &Record::Student(record))?;
        clear_claim(&opts.out, *job);
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
