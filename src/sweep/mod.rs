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
use crate::factorize::budget::BudgetStudent;
use crate::factorize::StudentPlan;
use crate::memory::{
    human, Gate, Limits, ModelShape, Place, Plan, Storage, TeacherPlan, TrainingRun,
};
use crate::model::import::ImportRecord;
use crate::model::params::{dense_ranks, param_count, validate_ranks, Ranks};
use crate::model::{Vit, VitConfig, VitParams};
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use crate::options::ComputeRecord;
use crate::provenance::{DataRef, FileRef, RunMeta, Training};
use crate::results::{append_record, read_records, Record, StudentRecord, TeacherRecord};
use crate::train::fit::evaluate;
use crate::train::spare_threads::{self, SpareThreads};
use crate::train::step::shards_for;
use crate::train::{
    train_student, AdamWConfig, FitOptions, Frozen, LossSpec, RunFiles, StudentRun, StudentStart,
    Teacher, TeacherLogits,
};
use anyhow::{anyhow, bail, Context, Result};
use jobs::{all_jobs, budget_jobs, finished, host_name, try_claim, Heartbeat, Job, Shard};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    /// How the teacher was imported or resampled (students record it).
    pub import: Option<ImportRecord>,
}

/// Settings of a sweep. Serialized whole into every student's record
/// (`StudentRecord::settings`) less the fields marked `skip`, which choose
/// which jobs run and where, not how a student is trained.
#[derive(Clone, Debug, Serialize)]
pub struct SweepOptions {
    #[serde(skip)]
    pub out: PathBuf,
    /// Where the teacher logits go on disk (`TeacherLogits`): `<out>/cache`
    /// for one sweep; one folder for every group of `sweep --groups`, whose
    /// students see the same teacher, data and augmentation, so the second
    /// group reads the logits the first computed.
    #[serde(skip)]
    pub cache_dir: PathBuf,
    #[serde(skip)]
    pub ranks: Vec<usize>,
    /// Budget students (`sweep --budgets`), each trained once per seed
    /// besides the ranks; each record carries its allocation.
    #[serde(skip)]
    pub budgets: Vec<BudgetStudent>,
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
    /// What computes the students (recorded in each record and checkpoint,
    /// and part of the teacher-logit cache key).
    pub compute: ComputeRecord,
    /// How often a job refreshes its claim, and when others give up on it.
    #[serde(skip)]
    pub heartbeat: Heartbeat,
    /// Students trained at once (results do not depend on it).
    #[serde(skip)]
    pub parallel: Parallel,
    /// What the machine has (`memory::Limits`): a student starts only
    /// while its memory plan fits beside the others', and `Parallel::Auto`
    /// trains no more at once than fit. `None`: unchecked.
    #[serde(skip)]
    pub memory: Option<Limits>,
    #[serde(skip)]
    pub quiet: bool,
}

impl SweepOptions {
    /// Whether students read teacher logits computed once per epoch (the
    /// loss needs a teacher's logits but not its features).
    pub fn uses_teacher_cache(&self) -> bool {
        self.cache_teacher && self.loss.needs_teacher() && !self.loss.needs_features()
    }
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
    if opts.ranks.is_empty() && opts.budgets.is_empty() {
        bail!("no ranks to sweep: give --ranks, e.g. --ranks 2,4,8,16 (or --budgets)");
    }
    if opts.seeds.is_empty() {
        bail!("no seeds: give --seeds, e.g. --seeds 0");
    }
    for &r in &opts.ranks {
        validate_ranks(cfg, &opts.plan.targets.ranks(cfg, r)?)
            .with_context(|| format!("--ranks contains {r}"))?;
    }
    if let Some(r) = repeated(&opts.ranks) {
        bail!("--ranks lists {r} more than once");
    }
    let budgets: Vec<usize> = opts.budgets.iter().map(budget_key).collect();
    if let Some(b) = repeated(&budgets) {
        bail!("--budgets gives {b} parameters more than once");
    }
    for b in &opts.budgets {
        validate_ranks(cfg, &b.ranks)
            .with_context(|| format!("the ranks allocated for budget {}", budget_key(b)))?;
    }
    if let Some(s) = repeated(&opts.seeds) {
        bail!("--seeds lists {s} more than once");
    }
    Ok(())
}

/// Every job of a sweep: each rank, then each budget, for every seed.
pub fn sweep_jobs(opts: &SweepOptions) -> Vec<Job> {
    let budgets: Vec<usize> = opts.budgets.iter().map(budget_key).collect();
    let mut jobs = all_jobs(&opts.ranks, &opts.seeds);
    jobs.extend(budget_jobs(&budgets, &opts.seeds));
    jobs
}

/// What names a budget student's jobs: the parameter count it allowed.
fn budget_key(b: &BudgetStudent) -> usize {
    b.allocation.budget_params
}

/// A job's per-layer ranks, and its budget student if it is a budget job.
pub fn job_ranks<'a>(
    cfg: &VitConfig,
    opts: &'a SweepOptions,
    job: &Job,
) -> Result<(Ranks, Option<&'a BudgetStudent>)> {
    match job.budget {
        None => Ok((opts.plan.targets.ranks(cfg, job.rank)?, None)),
        Some(b) => {
            let student = opts
                .budgets
                .iter()
                .find(|s| budget_key(s) == b)
                .ok_or_else(|| anyhow!("no allocation for budget {b}"))?;
            Ok((student.ranks.clone(), Some(student)))
        }
    }
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
    /// The engine, device, precision and paths (`ComputeRecord::cache_key`).
    compute: String,
}

/// Run this shard's part of the sweep.
pub fn run_sweep<B: Backend>(
    be: &B,
    inputs: &SweepInputs<'_>,
    opts: &SweepOptions,
) -> Result<SweepSummary> {
    let started = std::time::Instant::now();
    let cfg = inputs.cfg;
    validate_options(cfg, opts)?;
    crate::durable::create_folder(&opts.out)?;
    let results_file = opts.shard.results_file(&opts.out);
    let dense = dense_ranks(cfg);
    let teacher_params = param_count(cfg, &dense);
    let batch = opts.fit.batch;

    // The teacher's own accuracy, once per results folder.
    let known = read_records(&opts.out)?.into_iter().find_map(|r| match r {
        Record::Teacher(t) => Some(t),
        _ => None,
    });
    let teacher_top1 = match known {
        Some(t) => t.top1,
        None => {
            let mut teacher = Frozen::new(
                be,
                Vit::from_host(be, cfg, &dense, inputs.teacher, opts.compute.paths.model)?,
                batch,
            )?;
            let (top1, top5) = evaluate(inputs.test, batch, cfg.classes, |bytes, n| {
                teacher.logits(be, bytes, n, &inputs.transform)
            })?;
            append_record(
                &results_file,
                &Record::Teacher(TeacherRecord {
                    top1,
                    top5,
                    params: teacher_params,
                }),
            )?;
            top1
        }
    };
    if !opts.quiet {
        eprintln!(
            "teacher: {:.2}% top-1, {teacher_params} parameters",
            100.0 * teacher_top1
        );
    }

    let mine = opts.shard.select(&sweep_jobs(opts));
    let done = finished(&opts.out)?;
    let todo: Vec<Job> = mine
        .iter()
        .copied()
        .filter(|j| !done.contains_key(j))
        .collect();
    if !opts.quiet && todo.len() < mine.len() {
        eprintln!(
            "{} of {} jobs of this shard already finished; skipping them",
            mine.len() - todo.len(),
            mine.len()
        );
    }

    let use_cache = opts.uses_teacher_cache();
    let cache_key = serde_json::to_string(&TeacherCacheKey {
        teacher_sha256: &inputs.teacher_file.sha256,
        train: &inputs.data.train,
        transform: &inputs.transform,
        augment: &opts.fit.augment,
        batch,
        compute: opts.compute.cache_key(),
    })?;
    let (workers, room) = workers_and_room(be, inputs, opts, &todo)?;
    let gate = room.map(|r| r.gate);
    if !opts.quiet && workers > 1 {
        eprintln!(
            "training {workers} students at once, {} thread(s) each",
            (be.independent_workers() / workers).max(1)
        );
    }
    let shared = Shared {
        be,
        inputs,
        opts,
        results_file,
        teacher_top1,
        teacher_params,
        use_cache,
        cache_key,
        caches: Mutex::new(HashMap::new()),
        spare_threads: SpareThreads::new(),
        queue: Mutex::new(
            queue_order(&todo, workers, |job| {
                Ok(param_count(cfg, &job_ranks(cfg, opts, job)?.0))
            })?
            .into(),
        ),
        skipped_claimed: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        gate,
    };
    run_workers(&shared, workers)?;

    let caches = shared
        .caches
        .into_inner()
        .map_err(|_| anyhow!("teacher-logit cache lock poisoned"))?;
    let (mut computed, mut reused, mut seconds) = (0, 0, 0.0);
    for cache in caches.values() {
        let c = cache
            .lock()
            .map_err(|_| anyhow!("teacher-logit cache lock poisoned"))?;
        (computed, reused, seconds) = (
            computed + c.epochs_computed,
            reused + c.epochs_reused,
            seconds + c.teacher_seconds,
        );
    }
    let skipped_claimed = shared.skipped_claimed.load(Ordering::SeqCst);
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

/// How many students a sweep trains at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallel {
    /// Chosen from the device and the model (see `Parallel::workers`).
    Auto,
    /// This many (1: one after the other).
    Jobs(usize),
}

impl std::str::FromStr for Parallel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Parallel::Auto),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => {
                    bail!("--parallel '{n}': give a number of students (1 or more) or auto")
                }
                Ok(k) => Ok(Parallel::Jobs(k)),
            },
        }
    }
}

/// Models up to this width train several at once under `Parallel::Auto`
/// (`train::step::SMALL_MODEL_MAX_WIDTH`: their products are too small to
/// keep every thread busy, and a student per thread is faster).
pub use crate::train::step::SMALL_MODEL_MAX_WIDTH as AUTO_PARALLEL_MAX_WIDTH;

impl Parallel {
    /// Students at once for `jobs` jobs of a model of shape `cfg` on `be`:
    /// never more than the jobs or the device's independent workers.
    pub fn workers<D: crate::device::Device>(self, be: &D, cfg: &VitConfig, jobs: usize) -> usize {
        let wanted = match self {
            Parallel::Jobs(k) => k,
            Parallel::Auto if cfg.width <= AUTO_PARALLEL_MAX_WIDTH => be.independent_workers(),
            Parallel::Auto => 1,
        };
        wanted.min(be.independent_workers()).min(jobs).max(1)
    }
}

/// What the workers of one sweep share.
struct Shared<'a, B: Backend> {
    be: &'a B,
    inputs: &'a SweepInputs<'a>,
    opts: &'a SweepOptions,
    results_file: PathBuf,
    teacher_top1: f64,
    teacher_params: usize,
    use_cache: bool,
    cache_key: String,
    /// Teacher logits per seed, shared by every student of that seed.
    caches: Mutex<HashMap<u64, Arc<Mutex<TeacherLogits<B>>>>>,
    /// Threads of finished workers, lent to the students still training.
    spare_threads: SpareThreads,
    queue: Mutex<VecDeque<Job>>,
    skipped_claimed: AtomicUsize,
    /// Set when a job fails: the other workers take no new job.
    failed: AtomicBool,
    /// Memory left for students (`SweepOptions::memory`).
    gate: Option<Gate>,
}

/// A sweep's student of `ranks`, as far as memory goes (`memory`).
pub fn training_run<'a>(
    storage: Storage,
    inputs: &'a SweepInputs<'a>,
    opts: &SweepOptions,
    use_cache: bool,
    ranks: &'a Ranks,
    dense: &'a Ranks,
) -> TrainingRun<'a> {
    let cfg = inputs.cfg;
    let micro = opts.fit.batch.div_ceil(opts.fit.micro_batches.max(1));
    let teacher = ModelShape { cfg, ranks: dense };
    TrainingRun {
        model: ModelShape { cfg, ranks },
        batch: opts.fit.batch,
        micro_batches: opts.fit.micro_batches,
        shards: shards_for(&opts.compute.paths.model, cfg, micro),
        feature_loss: opts.loss.needs_features(),
        teacher: if use_cache {
            TeacherPlan::Cached {
                teacher,
                batch: opts.fit.batch,
                train_images: inputs.train.len(),
                caches: opts.seeds.len(),
            }
        } else if opts.loss.needs_teacher() {
            TeacherPlan::Live(teacher)
        } else {
            TeacherPlan::None
        },
        storage,
        data_bytes: inputs.train.held_bytes() + inputs.test.held_bytes(),
        image_bytes: inputs.train.image_len() as u64,
        // The teacher as loaded, and a student's factorized start.
        loaded_params: (param_count(cfg, dense) + param_count(cfg, ranks)) as u64,
    }
}

/// Students to train at once for `todo`: `opts.parallel` on `be`, and
/// under `Parallel::Auto` no more than the memory limits hold; with the
/// room each student reserves before it starts (`SweepOptions::memory`).
fn workers_and_room<B: Backend>(
    be: &B,
    inputs: &SweepInputs<'_>,
    opts: &SweepOptions,
    todo: &[Job],
) -> Result<(usize, Option<StudentRoom>)> {
    let room = student_room(be, inputs, opts, opts.uses_teacher_cache(), todo)?;
    let mut workers = opts.parallel.workers(be, inputs.cfg, todo.len());
    if let (Parallel::Auto, Some(r)) = (opts.parallel, &room) {
        workers = workers.min(r.gate.how_many(&r.largest).max(1));
    }
    Ok((workers, room))
}

/// How many students a sweep trains at once, and why (`--dry-run` says it).
#[derive(Clone, Copy, Debug)]
pub struct StudentsAtOnce {
    pub students: usize,
    /// Host and GPU bytes of what the students share (data, teacher,
    /// caches, the runtime), and of the largest student; None without a
    /// memory limit.
    pub shared: Option<[u64; 2]>,
    pub each: Option<[u64; 2]>,
}

/// Students a sweep of every job of `opts` (this shard's) would train at
/// once.
pub fn students_at_once<B: Backend>(
    be: &B,
    inputs: &SweepInputs<'_>,
    opts: &SweepOptions,
) -> Result<StudentsAtOnce> {
    let mine = opts.shard.select(&sweep_jobs(opts));
    let (students, room) = workers_and_room(be, inputs, opts, &mine)?;
    let totals = |p: &Plan| [p.total(Place::Host), p.total(Place::Device)];
    Ok(StudentsAtOnce {
        students,
        shared: room.as_ref().map(|r| totals(&r.shared)),
        each: room.as_ref().map(|r| totals(&r.largest)),
    })
}

/// What the memory limits leave a sweep's students: the plan of what they
/// share, of the largest student of the jobs, and the gate each passes
/// before it starts (the room beside the shared part).
struct StudentRoom {
    gate: Gate,
    shared: Plan,
    largest: Plan,
}

/// The students' room under `opts.memory` for `todo` (None without
/// limits or jobs). An error when the shared part alone does not fit.
fn student_room<B: Backend>(
    be: &B,
    inputs: &SweepInputs<'_>,
    opts: &SweepOptions,
    use_cache: bool,
    todo: &[Job],
) -> Result<Option<StudentRoom>> {
    let (Some(limits), Some(first)) = (opts.memory, todo.first()) else {
        return Ok(None);
    };
    let (storage, dense) = (Storage::of(be), dense_ranks(inputs.cfg));
    let ranks = job_ranks(inputs.cfg, opts, first)?.0;
    let shared = Plan::shared(&training_run(
        storage, inputs, opts, use_cache, &ranks, &dense,
    ));
    let mut largest: Option<Plan> = None;
    for job in todo {
        let ranks = job_ranks(inputs.cfg, opts, job)?.0;
        let p = Plan::worker(&training_run(
            storage, inputs, opts, use_cache, &ranks, &dense,
        ));
        if largest.as_ref().is_none_or(|l| {
            p.total(Place::Host) + p.total(Place::Device)
                > l.total(Place::Host) + l.total(Place::Device)
        }) {
            largest = Some(p);
        }
    }
    let Some(largest) = largest else {
        return Ok(None);
    };
    let room = |limit: Option<u64>, place: Place| -> Result<Option<u64>> {
        let Some(limit) = limit else { return Ok(None) };
        let need = shared.total(place);
        if need > limit {
            bail!(
                "not enough memory for the sweep: what its students share needs {} and {} is available ({})\n{shared}",
                human(need),
                human(limit),
                limits.host_source
            );
        }
        Ok(Some(limit - need))
    };
    let gate = Gate::new(
        room(limits.host, Place::Host)?,
        room(limits.device, Place::Device)?,
    );
    Ok(Some(StudentRoom {
        gate,
        shared,
        largest,
    }))
}

/// The order in which workers take `todo`: as listed for one worker; for
/// several, the costliest students first (most parameters, which is what a
/// student's products scale with), ties in listed order. Longest first is
/// the classic rule for jobs of unequal length on a few workers: the last
/// jobs to start are the shortest, so no thread idles long at the end. In
/// listed order the costliest (highest) rank was the last, trained alone
/// while the other thread waited (measured together with the LayerNorm
/// change of the same commit: demo sweep 12.7-13.2 → 11.6-11.9 s; this
/// order alone was not timed). Each student's result does not depend on
/// the order.
fn queue_order(
    todo: &[Job],
    workers: usize,
    params_of: impl Fn(&Job) -> Result<usize>,
) -> Result<Vec<Job>> {
    let mut order = todo.to_vec();
    if workers > 1 {
        let mut cost = HashMap::new();
        for j in todo {
            cost.insert(*j, params_of(j)?);
        }
        // A stable sort: equal costs keep their listed order.
        order.sort_by_key(|j| std::cmp::Reverse(cost[j]));
    }
    Ok(order)
}

/// Train the queued jobs on `workers` threads, each with its own share of
/// the device's threads (a rayon pool). Jobs are independent and every
/// random choice is a function of the job, and the CPU's products give the
/// same bits on any thread count, so the results do not depend on how many
/// run at once. A worker that finds the queue empty lends its threads to
/// the students still training until the sweep ends
/// (`train::spare_threads`). The first error stops the taking of new jobs
/// and is returned.
fn run_workers<B: Backend>(shared: &Shared<'_, B>, workers: usize) -> Result<()> {
    if workers <= 1 {
        return worker(shared);
    }
    let threads = (shared.be.independent_workers() / workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(move || -> Result<spare_threads::Lent> {
                    let pool = crate::device::cpu::thread_pool(threads)?;
                    pool.install(|| worker(shared))?;
                    Ok(shared.spare_threads.lend(threads))
                })
            })
            .collect();
        // Held until every worker is done, so no student holds a loan then.
        let mut lent = Vec::new();
        let mut first = Ok(());
        for h in handles {
            match h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a sweep worker panicked")))
            {
                Ok(l) => lent.push(l),
                Err(e) if first.is_ok() => first = Err(e),
                Err(_) => {}
            }
        }
        drop(lent);
        first
    })
}

/// Take jobs from the queue until it is empty or a job failed.
fn worker<B: Backend>(shared: &Shared<'_, B>) -> Result<()> {
    let mut live: Option<Frozen<B>> = None;
    loop {
        if shared.failed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(job) = shared
            .queue
            .lock()
            .map_err(|_| anyhow!("job queue lock poisoned"))?
            .pop_front()
        else {
            return Ok(());
        };
        let reserved = match &shared.gate {
            Some(gate) => {
                let ranks = shared
                    .opts
                    .plan
                    .targets
                    .ranks(shared.inputs.cfg, job.rank)?;
                let dense = dense_ranks(shared.inputs.cfg);
                let run = training_run(
                    Storage::of(shared.be),
                    shared.inputs,
                    shared.opts,
                    shared.use_cache,
                    &ranks,
                    &dense,
                );
                Some(gate.reserve(&Plan::worker(&run))?)
            }
            None => None,
        };
        let result = train_job(shared, job, &mut live);
        drop(reserved);
        if let Err(e) = result {
            shared.failed.store(true, Ordering::SeqCst);
            return Err(e);
        }
    }
}

/// The teacher logits of `seed`, made on first use.
fn cache_for<B: Backend>(
    shared: &Shared<'_, B>,
    seed: u64,
) -> Result<Arc<Mutex<TeacherLogits<B>>>> {
    let mut caches = shared
        .caches
        .lock()
        .map_err(|_| anyhow!("teacher-logit cache lock poisoned"))?;
    if let Some(c) = caches.get(&seed) {
        return Ok(c.clone());
    }
    let (be, inputs, batch) = (shared.be, shared.inputs, shared.opts.fit.batch);
    let t = Frozen::new(
        be,
        Vit::from_host(
            be,
            inputs.cfg,
            &dense_ranks(inputs.cfg),
            inputs.teacher,
            shared.opts.compute.paths.model,
        )?,
        batch,
    )?;
    let cache = Arc::new(Mutex::new(TeacherLogits::new(
        t,
        inputs.transform,
        shared.opts.fit.augment,
        seed,
        batch,
        Some(shared.opts.cache_dir.clone()),
        &shared.cache_key,
    )));
    caches.insert(seed, cache.clone());
    Ok(cache)
}

/// Claim, factorize, distill and record one job; `live` is this worker's
/// own teacher for losses that need it run on every batch.
fn train_job<B: Backend>(
    shared: &Shared<'_, B>,
    job: Job,
    live: &mut Option<Frozen<B>>,
) -> Result<()> {
    let (be, inputs, opts) = (shared.be, shared.inputs, shared.opts);
    let cfg = inputs.cfg;
    let job_start = std::time::Instant::now();
    let claim = match try_claim(&opts.out, job, opts.heartbeat)? {
        Ok(claim) => claim,
        Err(other) => {
            eprintln!(
                "{job} is being trained by {} (pid {}, heartbeat every {} s); skipping it here (it is taken over once it misses {} beats or its process is gone)",
                other.host, other.pid, other.heartbeat.every_s, other.heartbeat.stale_after_beats
            );
            shared.skipped_claimed.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
    };
    // Another process may have finished it since this one listed the work.
    if finished(&opts.out)?.contains_key(&job) {
        claim.release();
        shared.skipped_claimed.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    let (ranks, budget) = job_ranks(cfg, opts, &job)?;
    let plan = StudentPlan {
        init: opts.plan.init.with_seed(job.seed),
        ..opts.plan
    };
    let fit_opts = FitOptions {
        seed: job.seed,
        label: match job.budget {
            Some(b) => format!("budget {b}"),
            None => format!("rank {}", job.rank),
        },
        ..opts.fit.clone()
    };
    let cache = if shared.use_cache {
        Some(cache_for(shared, job.seed)?)
    } else {
        None
    };
    if opts.loss.needs_teacher() && !shared.use_cache && live.is_none() {
        *live = Some(Frozen::for_loss(
            be,
            Vit::from_host(
                be,
                cfg,
                &dense_ranks(cfg),
                inputs.teacher,
                opts.compute.paths.model,
            )?,
            opts.fit.batch,
            &opts.loss,
        )?);
    }
    let teacher_signal = match (&cache, live.as_mut()) {
        (Some(c), _) => Teacher::Cached(c),
        (None, Some(t)) if opts.loss.needs_teacher() => Teacher::Live(t),
        _ => Teacher::None,
    };
    let job_opts = SweepOptions {
        fit: fit_opts.clone(),
        plan,
        ..opts.clone()
    };
    let mut meta = student_meta(inputs, &job_opts);
    meta.allocation = budget.map(|b| b.allocation.clone());
    let files = RunFiles::new(&job.dir(&opts.out));
    warn_if_resumed_on_other_data(&files, &inputs.data, job);
    let run = StudentRun {
        cfg,
        teacher: inputs.teacher,
        start: StudentStart::Factorize {
            ranks: ranks.clone(),
            plan,
        },
        train: inputs.train,
        test: inputs.test,
        transform: &inputs.transform,
        loss: &opts.loss,
        fit: &fit_opts,
        optimizer: opts.optimizer,
        files: &files,
        meta: &meta,
        paths: opts.compute.paths.model,
        spare_threads: Some(shared.spare_threads.clone()),
    };
    let mut heartbeat = |epoch: usize| claim.epoch_done(epoch, opts.heartbeat);
    let summary = train_student(be, &run, teacher_signal, &mut heartbeat)
        .with_context(|| format!("training {job}"))?;
    let params = param_count(cfg, &ranks);
    let record = StudentRecord {
        rank: job.rank,
        seed: job.seed,
        top1: summary.test_top1,
        top5: summary.test_top5,
        params,
        teacher_params: shared.teacher_params,
        compression: shared.teacher_params as f64 / params as f64,
        epochs: fit_opts.epochs,
        wall_s: job_start.elapsed().as_secs_f64(),
        host: host_name(),
        settings: serde_json::to_value(&job_opts)?,
        resumed_from_epoch: summary.resumed_from_epoch,
        allocation: budget.map(|b| Box::new(b.allocation.clone())),
        ranks: budget.map(|_| ranks.clone()),
    };
    append_record(&shared.results_file, &Record::Student(record))?;
    claim.release();
    if !opts.quiet {
        // Rank jobs keep their aligned column.
        let name = match job.budget {
            None => format!("rank {:>4} seed {}", job.rank, job.seed),
            Some(_) => job.to_string(),
        };
        eprintln!(
            "{name}: {:.2}% top-1 ({:.1}% of the teacher), {:.1}x fewer parameters, {:.1} s",
            100.0 * summary.test_top1,
            100.0 * summary.test_top1 / shared.teacher_top1.max(1e-12),
            shared.teacher_params as f64 / params as f64,
            job_start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A warning when a job about to resume was started on other data.
fn warn_if_resumed_on_other_data(files: &RunFiles, data: &DataRef, job: Job) {
    if !files.state().is_file() {
        return;
    }
    let recorded = crate::model::checkpoint::read_metadata(&files.model())
        .ok()
        .and_then(|m| RunMeta::from_metadata(&m, &files.model()).ok().flatten())
        .and_then(|r| r.data);
    if let Some(recorded) = recorded {
        let d = recorded.differences(data);
        if !d.is_empty() {
            eprintln!("warning: {job} resumes a run started on other data ({}); delete {} to start it again", d.join(", "), files.dir.display());
        }
    }
}

/// The provenance of one job's student.
fn student_meta(inputs: &SweepInputs<'_>, job: &SweepOptions) -> RunMeta {
    let training = Training {
        data: &inputs.data,
        loss: &job.loss,
        fit: &job.fit,
        optimizer: job.optimizer,
        compute: &job.compute,
    };
    let mut meta = RunMeta::student(
        inputs.normalize,
        inputs.transform.resize,
        inputs.teacher_file.clone(),
        Some(&job.plan),
        Some(training),
    );
    meta.import = inputs.import.clone();
    meta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_workers_take_the_costliest_students_first_one_takes_them_as_listed() {
        let todo: Vec<Job> = all_jobs(&[1, 64, 8, 2], &[0, 1]);
        let cost = |j: &Job| Ok(1000 + 10 * j.rank);
        assert_eq!(queue_order(&todo, 1, cost).unwrap(), todo);
        let ranks: Vec<(usize, u64)> = queue_order(&todo, 2, cost)
            .unwrap()
            .iter()
            .map(|j| (j.rank, j.seed))
            .collect();
        let mut want: Vec<(usize, u64)> = todo.iter().map(|j| (j.rank, j.seed)).collect();
        want.sort_by_key(|&(r, _)| std::cmp::Reverse(r));
        assert_eq!(
            ranks, want,
            "by rank, highest first; seeds in listed order within a rank"
        );
        // The cost the sweep uses grows with the rank.
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let params = |r| param_count(&cfg, &crate::model::params::uniform_ranks(&cfg, r));
        assert!(params(1) < params(8) && params(8) < params(64));
        assert!(queue_order(&todo, 2, |_| bail!("no such rank")).is_err());
    }
}
