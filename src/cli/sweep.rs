//! `effrank-engine sweep`: factorize, distill and evaluate at every rank,
//! durably and resumably, then analyze. `--demo` runs the whole pipeline on
//! the built-in data; `--status` shows a (distributed) sweep's progress.

use super::common::{
    dispatch, Accumulate, ComputeFlags, DataFlags, FactorFlags, ImportFlags, LossFlags,
    MemoryFlags, RankBoundFlags, Schedule, TrainFlags, WithBackend,
};
use super::memory::{self, Planned};
use super::recipe::{self, Recipe};
use super::setup::{
    load_data_for, load_model_with, load_teacher_or_init, model_input, transform_for,
    warn_if_other_data, ModelInput, ModelProbe, ModelSource,
};
use anyhow::{bail, Context, Result};
use clap::Args;
use effrank_engine::analysis::sensitivity::SensitivityReport;
use effrank_engine::analysis::{
    analyze_budgets, analyze_folder, analyze_labelled, suggest_ranks, AnalysisOptions, Labelled,
};
use effrank_engine::data::{Dataset, Normalize};
use effrank_engine::durable::atomic_write;
use effrank_engine::factorize::budget::{
    allocate_from_sensitivity, ranks_table, Budget, BudgetStudent,
};
use effrank_engine::factorize::{LayerSet, StudentPlan, Targets};
use effrank_engine::memory::{human, Plan, Storage};
use effrank_engine::model::params::{dense_ranks, is_lowrank, max_rank, param_count};
use effrank_engine::model::Vit;
use effrank_engine::model::VitConfig;
use effrank_engine::ops::Backend;
use effrank_engine::options::ComputeRecord;
use effrank_engine::provenance::{DataRef, FileRef, RunMeta, Training};
use effrank_engine::sweep::jobs::{
    all_jobs, budget_jobs, claim_state, finished, read_claim, Heartbeat, Shard,
};
use effrank_engine::sweep::{
    job_ranks, run_sweep, students_at_once, sweep_jobs, training_run, Parallel, SweepInputs,
    SweepOptions, SweepSummary,
};
use effrank_engine::train::{fit, FitOptions, FitRun, LossSpec, RunFiles, Teacher, Trainer};
use std::path::{Path, PathBuf};

/// Sweep the rank r of a factorized student: for each rank (and seed),
/// factorize the teacher, distill, evaluate; then find the effective-rank
/// region and knee.
///
/// The whole pipeline on built-in data (a few minutes on a 2-core CPU):
///
///     effrank-engine sweep --demo
///
/// A real sweep, then the same command again to resume after an interruption:
///
///     effrank-engine sweep --teacher runs/b32/model.safetensors --data ~/cifar-100-binary \
///         --ranks 2,4,8,16,24,32,48,64,80,96,112,128,160,192,224,256 --epochs 20 --lr 1e-4 --out runs/sweep
///
/// Split over machines (each writes its own results-shard<I>of<N>.jsonl into
/// the shared --out; Slurm arrays and Kubernetes indexed Jobs set the shard
/// through the environment), then look at the progress:
///
///     effrank-engine sweep --teacher t.safetensors --ranks 2,4,8,16 --shard 0/2 --out runs/sweep
///     effrank-engine sweep --status --out runs/sweep --ranks 2,4,8,16
///
/// One curve per layer group (each in its own folder, <out>/attn and
/// <out>/mlp here), then one analysis of both in --out:
///
///     effrank-engine sweep --teacher t.safetensors --ranks 2,4,8,16 --groups attn,mlp --out runs/groups
///
/// Uniform ranks against students whose per-layer ranks are allocated for
/// a parameter budget (from `effrank-engine sensitivity`), compared by
/// parameter count in budget.png:
///
///     effrank-engine sweep --teacher t.safetensors --ranks 2,4,8,16 --budgets 8x,4x \
///         --sensitivity runs/sens --seeds 0,1,2 --out runs/budgets
///
/// The reference protocol's students (see the table at the end of --help):
///
///     effrank-engine sweep --recipe reference --teacher runs/b32-reference/model.safetensors \
///         --data ~/cifar-100-binary --out runs/reference
///
/// --demo uses fixed settings: a vit-demo teacher trained 12 epochs on the
/// demo data (runs/demo/teacher), students at ranks 1,2,4,8,16,32,64 distilled
/// 6 epochs each with KD, lr 2e-3, batch 64; --ranks, --seeds, --out,
/// --device and --quiet still apply.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment, after_long_help = recipe::sweep_help())]
pub struct SweepArgs {
    /// Run the built-in demo: train a small teacher, sweep, analyze.
    #[arg(long)]
    pub demo: bool,
    /// Set every setting of a named protocol at once (`reference`: the
    /// paper's students; see the table at the end of --help); a flag given
    /// explicitly overrides the recipe's value.
    #[arg(long, value_enum, conflicts_with = "demo")]
    pub recipe: Option<Recipe>,
    /// The dense teacher (any importable naming).
    #[arg(long, required_unless_present_any = ["demo", "status"])]
    pub teacher: Option<PathBuf>,
    /// Ranks to train, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub ranks: Vec<usize>,
    /// Budget students besides (or instead of) --ranks, comma-separated:
    /// parameter counts or compression factors (N or Nx); each layer's
    /// rank is allocated from --sensitivity's curves as `factorize
    /// --budget` does, and each budget is trained once per seed
    /// (runs/b<params>-s<seed>). `analyze` then draws both kinds of
    /// student against their parameter count (budget.png).
    #[arg(
        long,
        value_delimiter = ',',
        requires = "sensitivity",
        conflicts_with = "groups",
        value_name = "N|Nx"
    )]
    pub budgets: Vec<Budget>,
    /// The sensitivity pass (its folder or analysis.json) --budgets
    /// allocates from (`effrank-engine sensitivity`).
    #[arg(long, value_name = "PATH")]
    pub sensitivity: Option<PathBuf>,
    #[command(flatten)]
    pub bounds: RankBoundFlags,
    /// Seeds: each rank is trained once per seed.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Run only shard I of N (0-based), e.g. 0/4; default: from
    /// SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX/EFFRANK_SHARD_COUNT,
    /// else everything.
    #[arg(long)]
    pub shard: Option<String>,
    /// Start from the given ranks and add ranks the analysis suggests until
    /// the effective-rank region is pinned to ±1 rank.
    #[arg(long)]
    pub adaptive: bool,
    /// Most ranks added by --adaptive.
    #[arg(long, default_value_t = 12)]
    pub adaptive_budget: usize,
    /// Show finished, running, dead, stale and missing jobs of --out and exit.
    #[arg(long)]
    pub status: bool,
    /// Seconds between refreshes of a running job's claim
    /// (runs/r<rank>-s<seed>/running.json).
    #[arg(long, default_value_t = Heartbeat::default().every_s, value_name = "SECONDS")]
    pub heartbeat: u64,
    /// Missed heartbeats after which another host takes a job over (on the
    /// same host a dead process's job is taken over at once).
    #[arg(long, default_value_t = Heartbeat::default().stale_after_beats, value_name = "BEATS")]
    pub stale_after: u64,
    /// Students trained at once, each on its share of the CPU's threads:
    /// a number, or auto (every thread its own student for models up to
    /// width 256, whose products are too small to share the threads well;
    /// one at a time for wider models and on a GPU). Results are the same
    /// bits whatever the number.
    #[arg(long, default_value = "auto")]
    pub parallel: Parallel,
    /// Do not run the analysis at the end.
    #[arg(long)]
    pub no_analyze: bool,
    /// One sweep per layer group, comma-separated (each a --layers value,
    /// its layers joined by + : attn,mlp,all or q+k,v), each into
    /// <out>/<group>/, then one analysis of all of them in --out.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "layers",
        value_name = "GROUPS"
    )]
    pub groups: Vec<LayerSet>,
    #[command(flatten)]
    pub factor: FactorFlags,
    /// Recompute the teacher's logits for every rank instead of caching them.
    #[arg(long)]
    pub no_teacher_cache: bool,
    #[command(flatten)]
    pub import: ImportFlags,
    #[command(flatten)]
    pub loss: LossFlags,
    #[command(flatten)]
    pub data: DataFlags,
    #[command(flatten)]
    pub train: TrainFlags,
    /// Results folder (shared by all shards).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryFlags,
    #[command(flatten)]
    pub compute: ComputeFlags,
    #[arg(long)]
    pub quiet: bool,
}

/// The demo's fixed settings.
const DEMO_RANKS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
const DEMO_TEACHER_EPOCHS: usize = 12;
const DEMO_STUDENT_EPOCHS: usize = 6;
const DEMO_LR: f32 = 2e-3;
const DEMO_BATCH: usize = 64;

pub fn run(mut args: SweepArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(if args.demo { "runs/demo" } else { "runs/sweep" }));
    args.out = Some(out.clone());
    if args.status {
        return args
            .group_folders(&out)
            .iter()
            .try_for_each(|(_, dir)| print_status(dir, &args.ranks, &args.budgets, &args.seeds));
    }
    if args.demo {
        if args.ranks.is_empty() {
            args.ranks = DEMO_RANKS.to_vec();
        }
        args.data.data = Some("demo".into());
        args.train.epochs = DEMO_STUDENT_EPOCHS;
        args.train.lr = DEMO_LR;
        args.train.batch = DEMO_BATCH;
    }
    args.train.validate()?;
    args.loss.spec()?;
    args.factor.plan(0)?;
    if let Some(g) = repeated_group(&args.groups) {
        bail!("--groups lists {g} more than once");
    }
    if args.ranks.is_empty() && args.budgets.is_empty() {
        bail!("give the ranks to train, e.g. --ranks 2,4,8,16,32 (or --budgets)");
    }
    dispatch(&args.compute.clone(), args.quiet, args)
}

impl WithBackend for SweepArgs {
    type Output = ();
    fn run<B: Backend>(mut self, be: &B, compute: &ComputeRecord) -> Result<()> {
        let started = std::time::Instant::now();
        let out = self.out.clone().expect("set in run");
        // A teacher given by file names the data it was trained on; the
        // demo teacher is trained here, on the data chosen without it.
        let given = self
            .teacher
            .as_ref()
            .map(|p| load_model_with(p, &self.import.options()))
            .transpose()?;
        let input = match &given {
            Some(t) => ModelInput::of(t, &self.data),
            None => ModelProbe::new(&demo_teacher_source())?.input(&self.data),
        };
        let choice = self.data.choose(
            given
                .as_ref()
                .and_then(|t| t.run.as_ref())
                .and_then(|r| r.data.as_ref()),
            input,
        );
        let (train, test, data) = load_data_for(&choice, self.quiet)?;
        self.train.fit_batch_to(train.len());
        let (teacher_path, teacher) = match (&self.teacher, given) {
            (Some(p), Some(t)) => (p.clone(), t),
            _ => {
                let path = train_demo_teacher(be, compute, &out, &train, &test, &data, self.quiet)?;
                let t = load_model_with(&path, &self.import.options())?;
                (path, t)
            }
        };
        if is_lowrank(&teacher.ranks) {
            bail!(
                "--teacher {} is a low-rank model; the teacher must be dense",
                teacher_path.display()
            );
        }
        warn_if_other_data(
            teacher.run.as_ref(),
            &data,
            &format!("the teacher {}", teacher_path.display()),
        );
        let (normalize, transform) = model_input(&self.data, &teacher, &train, &choice.source)?;
        let shard = match &self.shard {
            Some(s) => Shard::parse(s)?,
            None => Shard::from_env(|k| std::env::var(k).ok())?.unwrap_or(Shard::ALL),
        };
        let teacher_file = FileRef::of(&teacher_path)?;
        let inputs = SweepInputs {
            cfg: &teacher.cfg,
            teacher: &teacher.params,
            teacher_file,
            train: &train,
            test: &test,
            normalize,
            transform,
            data,
            import: teacher.import.clone(),
        };
        let base = self.factor.plan(0)?;
        let mut groups_done = Vec::new();
        // One teacher-logit cache for every group: same teacher, data and augmentation.
        let cache_dir = out.join("cache");
        for (group, dir) in self.group_folders(&out) {
            let targets = Targets {
                layers: group.unwrap_or(base.targets.layers),
                ..base.targets
            };
            let group_sweep = GroupSweep {
                out: &dir,
                cache_dir: &cache_dir,
                plan: StudentPlan { targets, ..base },
                shard,
            };
            let done = self.sweep_one(be, compute, &inputs, group_sweep, started)?;
            if let (Some(g), true) = (group, done) {
                groups_done.push(Labelled {
                    label: g.to_string(),
                    path: dir,
                });
            }
        }
        if self.groups.is_empty() || self.no_analyze || groups_done.len() < self.groups.len() {
            return Ok(());
        }
        let report = analyze_labelled(&groups_done, &out, &AnalysisOptions::default())
            .context("analyzing the groups together")?;
        println!("{}", report.terminal_summary());
        println!(
            "wrote the joint analysis of {} groups (analysis.json, summary.md, plot.png) to {}",
            groups_done.len(),
            out.display()
        );
        Ok(())
    }
}

impl SweepArgs {
    /// The student of each of --budgets for the layers `plan` targets.
    fn budget_students(&self, cfg: &VitConfig, plan: &StudentPlan) -> Result<Vec<BudgetStudent>> {
        let Some(path) = &self.sensitivity else {
            return Ok(Vec::new());
        };
        let report = SensitivityReport::read(path)?;
        if report.init != plan.init && !self.budgets.is_empty() {
            eprintln!(
                "note: the curves were measured with {:?} factors, the students' are {:?}",
                report.init, plan.init
            );
        }
        let file = SensitivityReport::file(path);
        let targets = plan.targets.ranks(cfg, 1)?;
        self.budgets
            .iter()
            .map(|&budget| {
                let s = allocate_from_sensitivity(
                    cfg,
                    &report,
                    &file,
                    &targets,
                    budget,
                    self.bounds.bounds(),
                )
                .with_context(|| format!("--budgets {budget}"))?;
                if !self.quiet {
                    eprint!(
                        "budget {budget}: {} parameters allowed, {} used, ranks\n{}",
                        s.allocation.budget_params,
                        s.allocation.params,
                        ranks_table(&s.ranks)
                    );
                }
                Ok(s)
            })
            .collect()
    }

    fn claim_heartbeat(&self) -> Heartbeat {
        Heartbeat {
            every_s: self.heartbeat,
            stale_after_beats: self.stale_after,
        }
    }

    /// The results folder of each sweep this command runs, with its layer
    /// group: --out itself without --groups, else one folder per group.
    fn group_folders(&self, out: &Path) -> Vec<(Option<LayerSet>, PathBuf)> {
        if self.groups.is_empty() {
            return vec![(None, out.to_path_buf())];
        }
        self.groups
            .iter()
            .map(|g| (Some(*g), out.join(g.to_string())))
            .collect()
    }

    /// One sweep as `group` says: train (and with --adaptive refine) every
    /// job of this shard, write the shard's summary, and analyze the folder
    /// when every job is done. True when it is (and analyzed, unless
    /// --no-analyze).
    fn sweep_one<B: Backend>(
        &self,
        be: &B,
        compute: &ComputeRecord,
        inputs: &SweepInputs<'_>,
        group: GroupSweep<'_>,
        started: std::time::Instant,
    ) -> Result<bool> {
        let GroupSweep {
            out,
            cache_dir,
            plan,
            shard,
        } = group;
        let mut opts = SweepOptions {
            out: out.to_path_buf(),
            cache_dir: cache_dir.to_path_buf(),
            ranks: self.ranks.clone(),
            budgets: self.budget_students(inputs.cfg, &plan)?,
            seeds: self.seeds.clone(),
            shard,
            plan,
            loss: self.loss.spec()?,
            fit: self.train.fit_options("", self.quiet),
            optimizer: self.train.optimizer(),
            cache_teacher: !self.no_teacher_cache,
            compute: compute.clone(),
            heartbeat: self.claim_heartbeat(),
            parallel: self.parallel,
            memory: Some(memory::limits(be, &self.memory)?),
            quiet: self.quiet,
        };
        // The plan of the costliest student (the most parameters) decides
        // --accumulate auto and is what --dry-run prints.
        let mut top_ranks = None;
        for job in sweep_jobs(&opts) {
            let ranks = job_ranks(inputs.cfg, &opts, &job)?.0;
            if top_ranks
                .as_ref()
                .is_none_or(|t| param_count(inputs.cfg, &ranks) > param_count(inputs.cfg, t))
            {
                top_ranks = Some(ranks);
            }
        }
        let top_ranks = top_ranks.context("a sweep needs --ranks or --budgets")?;
        let dense = dense_ranks(inputs.cfg);
        let planned = memory::plan_training(
            be,
            &self.memory,
            self.train.batch,
            self.train.accumulate,
            self.quiet,
            |batch, micro_batches| {
                let o = SweepOptions {
                    fit: FitOptions {
                        batch,
                        micro_batches,
                        ..opts.fit.clone()
                    },
                    ..opts.clone()
                };
                Plan::training(&training_run(
                    Storage::of(be),
                    inputs,
                    &o,
                    o.uses_teacher_cache(),
                    &top_ranks,
                    &dense,
                ))
            },
        )?;
        match planned {
            Planned::Go { micro_batches } => opts.fit.micro_batches = micro_batches,
            Planned::DryRun => {
                let at_once = students_at_once(be, inputs, &opts)?;
                match (at_once.shared, at_once.each) {
                    (Some([shared, _]), Some([each, _])) => println!(
                        "students at once: {} (host: each student up to {}, beside {} they share)",
                        at_once.students,
                        human(each),
                        human(shared)
                    ),
                    _ => println!("students at once: {}", at_once.students),
                }
                return Ok(false);
            }
        }
        let mut summary = run_sweep(be, inputs, &opts)?;
        if self.adaptive {
            self.refine(be, inputs, &mut opts, &mut summary)?;
        }
        summary.wall_s = started.elapsed().as_secs_f64();
        atomic_write(
            &out.join(format!(
                "sweep-summary-shard{}of{}.json",
                shard.index, shard.count
            )),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        print_summary(&summary, out);
        let all_done = {
            let done = finished(out)?;
            sweep_jobs(&opts).iter().all(|j| done.contains_key(j))
        };
        if !all_done {
            println!("other shards are still missing ranks; run `effrank-engine analyze --results {}` when they finish", out.display());
            return Ok(false);
        }
        if !self.no_analyze {
            if !opts.ranks.is_empty() {
                let report = analyze_folder(out, &AnalysisOptions::default())
                    .context("analyzing the sweep")?;
                println!("{}", report.terminal_summary());
            }
            if let Some(b) = analyze_budgets(out, out, &AnalysisOptions::default())
                .context("comparing the budget students with the uniform ones")?
            {
                print!("{}", b.terminal_summary());
            }
        }
        Ok(true)
    }

    /// --adaptive: add the ranks the analysis suggests until none is left
    /// or the budget is spent.
    fn refine<B: Backend>(
        &self,
        be: &B,
        inputs: &SweepInputs<'_>,
        opts: &mut SweepOptions,
        summary: &mut SweepSummary,
    ) -> Result<()> {
        let max_rank = max_rank(inputs.cfg);
        let mut added = 0;
        while added < self.adaptive_budget {
            let points = mean_points(&opts.out)?;
            let next = suggest_ranks(
                &points,
                summary.teacher_top1,
                &AnalysisOptions::default(),
                2,
                1,
                max_rank,
            );
            let next: Vec<usize> = next
                .into_iter()
                .filter(|r| !opts.ranks.contains(r))
                .take(self.adaptive_budget - added)
                .collect();
            if next.is_empty() {
                break;
            }
            if !self.quiet {
                eprintln!("adaptive: adding ranks {next:?}");
            }
            added += next.len();
            opts.ranks.extend(&next);
            let more = run_sweep(be, inputs, opts)?;
            summary.trained += more.trained;
            summary.teacher_epochs_computed += more.teacher_epochs_computed;
            summary.teacher_epochs_reused += more.teacher_epochs_reused;
            summary.teacher_seconds += more.teacher_seconds;
        }
        Ok(())
    }
}

/// One sweep of a command: into `out` with `plan` (one layer group's, or
/// the only one), its teacher logits in `cache_dir` (`<--out>/cache`,
/// shared by the groups), this shard's jobs.
struct GroupSweep<'a> {
    out: &'a Path,
    cache_dir: &'a Path,
    plan: StudentPlan,
    shard: Shard,
}

/// A group that appears twice in `groups`.
fn repeated_group(groups: &[LayerSet]) -> Option<LayerSet> {
    groups
        .iter()
        .enumerate()
        .find(|(i, g)| groups[..*i].contains(g))
        .map(|(_, g)| *g)
}

/// The teacher a sweep without --teacher trains first.
fn demo_teacher_source() -> ModelSource {
    ModelSource::Preset {
        name: "vit-demo".into(),
        seed: 0,
        shape: Default::default(),
    }
}

/// Train (or resume) the demo teacher in `<out>/teacher`; returns its checkpoint.
fn train_demo_teacher<B: Backend>(
    be: &B,
    compute: &ComputeRecord,
    out: &Path,
    train: &Dataset,
    test: &Dataset,
    data: &DataRef,
    quiet: bool,
) -> Result<PathBuf> {
    let dir = out.join("teacher");
    let files = RunFiles::new(&dir);
    let done = dir.join("summary.json");
    if done.exists() {
        return Ok(files.model());
    }
    let seed = 0;
    let teacher = load_teacher_or_init(&demo_teacher_source(), train.classes)?;
    let normalize = Normalize::Half;
    let transform = transform_for(&teacher.cfg, train, normalize, None)?;
    let flags = TrainFlags {
        epochs: DEMO_TEACHER_EPOCHS,
        batch: DEMO_BATCH,
        lr: DEMO_LR,
        schedule: Schedule::Cosine,
        min_lr: 1e-5,
        wd: 0.05,
        warmup: 1.0,
        clip: 1.0,
        seed,
        crop_padding: 2,
        no_flip: false,
        eval_last_only: false,
        accumulate: Accumulate::MicroBatches(1),
    };
    let loss = LossSpec::ce();
    let mut trainer = Trainer::new(
        be,
        Vit::from_host(
            be,
            &teacher.cfg,
            &teacher.ranks,
            &teacher.params,
            compute.paths.model,
        )?,
        DEMO_BATCH,
        flags.optimizer(),
    )?;
    if !quiet {
        eprintln!(
            "demo: training the vit-demo teacher ({DEMO_TEACHER_EPOCHS} epochs) on {}",
            be.name()
        );
    }
    let fit_opts = flags.fit_options("teacher", quiet);
    let meta = RunMeta::teacher(
        normalize,
        None,
        Training {
            data,
            loss: &loss,
            fit: &fit_opts,
            optimizer: flags.optimizer(),
            compute,
        },
    );
    let summary = fit(
        be,
        &mut trainer,
        Teacher::None,
        FitRun {
            train,
            test,
            transform: &transform,
            loss: &loss,
            opts: &fit_opts,
        },
        &files,
        &meta,
        &mut |_| Ok(()),
    )?;
    atomic_write(&done, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(files.model())
}

/// Mean accuracy per rank over seeds, from the results folder.
fn mean_points(out: &Path) -> Result<Vec<(f64, f64)>> {
    let mut by_rank: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for (job, rec) in finished(out)? {
        by_rank.entry(job.rank).or_default().push(rec.top1);
    }
    Ok(by_rank
        .into_iter()
        .map(|(r, v)| (r as f64, v.iter().sum::<f64>() / v.len() as f64))
        .collect())
}

fn print_summary(s: &SweepSummary, out: &Path) {
    println!(
        "sweep: {} jobs in this shard, {} trained, {} already finished; teacher {:.2}% top-1; {:.1} s; results in {}",
        s.jobs_in_shard,
        s.trained,
        s.skipped,
        100.0 * s.teacher_top1,
        s.wall_s,
        out.display()
    );
    if s.teacher_epochs_computed + s.teacher_epochs_reused > 0 {
        println!(
            "teacher logits: {} epochs computed ({:.1} s of teacher forward passes), {} reused from the cache",
            s.teacher_epochs_computed, s.teacher_seconds, s.teacher_epochs_reused
        );
    }
}

/// `--status`: finished, running (host, pid, epoch, last beat), dead or
/// stale (with the claim's age; the next sweep takes these over) and
/// missing jobs, by the same rule the sweep applies.
fn print_status(out: &Path, ranks: &[usize], budgets: &[Budget], seeds: &[u64]) -> Result<()> {
    if !out.exists() {
        bail!("--out {} does not exist", out.display());
    }
    let done = finished(out)?;
    let mut ranks = ranks.to_vec();
    if ranks.is_empty() {
        ranks = done
            .keys()
            .filter(|j| j.budget.is_none())
            .map(|j| j.rank)
            .collect();
        ranks.dedup();
    }
    let mut jobs = all_jobs(&ranks, seeds);
    // Budget jobs: those of the budgets given as counts, and every finished
    // one (a factor's count needs the teacher, which --status does not read).
    let counts: Vec<usize> = budgets
        .iter()
        .filter_map(|b| match b {
            Budget::Params(n) => Some(*n),
            Budget::Compression(_) => None,
        })
        .collect();
    jobs.extend(budget_jobs(&counts, seeds));
    jobs.extend(
        done.keys()
            .filter(|j| j.budget.is_some() && !jobs.contains(j))
            .collect::<Vec<_>>(),
    );
    if counts.len() < budgets.len() {
        println!("(budgets given as a factor Nx are listed once finished; give their parameter counts to see them missing or running)");
    }
    let (mut n_done, mut n_running, mut n_abandoned, mut missing) = (0, 0, 0, Vec::new());
    println!("{:>6} {:>6}  {:<10} detail", "rank", "seed", "state");
    for job in &jobs {
        // A budget job shows its budget: b<params>.
        let rank = match job.budget {
            Some(b) => format!("b{b}"),
            None => job.rank.to_string(),
        };
        if let Some(rec) = done.get(job) {
            n_done += 1;
            println!(
                "{:>6} {:>6}  {:<10} top-1 {:.2}% on {}",
                rank,
                job.seed,
                "finished",
                100.0 * rec.top1,
                rec.host
            );
        } else if let Some((claim, age)) = read_claim(out, *job) {
            let state = claim_state(&claim, age);
            match state {
                effrank_engine::sweep::jobs::ClaimState::Live => n_running += 1,
                _ => {
                    n_abandoned += 1;
                    missing.push(*job);
                }
            }
            println!(
                "{:>6} {:>6}  {:<10} on {} (pid {}), {} epochs done, last heartbeat {age} s ago (every {} s)",
                rank,
                job.seed,
                state.name(),
                claim.host,
                claim.pid,
                claim.epoch,
                claim.heartbeat.every_s
            );
        } else {
            missing.push(*job);
            println!("{:>6} {:>6}  {:<10}", rank, job.seed, "missing");
        }
    }
    println!("{n_done} finished, {n_running} running, {n_abandoned} dead or stale (taken over by the next sweep), {} missing", jobs.len() - n_done - n_running - n_abandoned);
    let list = |values: Vec<usize>| {
        let mut v = values;
        v.dedup();
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let missing_ranks = list(
        missing
            .iter()
            .filter(|j| j.budget.is_none())
            .map(|j| j.rank)
            .collect(),
    );
    let missing_budgets = list(missing.iter().filter_map(|j| j.budget).collect());
    match (missing_ranks.is_empty(), missing_budgets.is_empty()) {
        (true, true) => {}
        (false, true) => println!("to run only what is missing: --ranks {missing_ranks}"),
        (true, false) => println!("to run only what is missing: --budgets {missing_budgets}"),
        (false, false) => println!(
            "to run only what is missing: --ranks {missing_ranks} --budgets {missing_budgets}"
        ),
    }
    Ok(())
}
