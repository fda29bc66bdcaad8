//! `effrank-engine sensitivity`: each layer of a teacher factorized alone
//! at each rank of a grid, measured against the teacher on a calibration
//! split (`analysis::sensitivity`); the curves `factorize --budget`
//! allocates ranks from.

use super::common::{dispatch, ComputeFlags, DataFlags, FactorFlags, ImportFlags, WithBackend};
use super::setup::{load_data_for, load_model_with, transform_for, ModelInput};
use anyhow::{bail, Result};
use clap::Args;
use effrank_engine::analysis::output::write_sensitivity;
use effrank_engine::analysis::sensitivity::{
    measure, Probe, SensitivityReport, SensitivitySettings, Subject,
};
use effrank_engine::durable::create_folder;
use effrank_engine::factorize::{calibrate, FactorInit, FromTeacher};
use effrank_engine::model::params::BlockLinear;
use effrank_engine::ops::Backend;
use effrank_engine::options::ComputeRecord;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// Measure how much each layer of a teacher can be squeezed on its own:
/// every factorizable layer (q, k, v, proj, fc1, fc2 of every block, or
/// those --layers and --blocks name) factorized alone at each rank of
/// --ranks, the rest dense, on --images training images; no training.
///
/// Examples:
///
///     effrank-engine sensitivity --teacher runs/demo/teacher/model.safetensors
///     effrank-engine sensitivity --teacher t.safetensors --ranks 1,2,4,8,16,32 --images 1024 --init svd-act
///     effrank-engine factorize --teacher t.safetensors --budget 4x --sensitivity runs/sens
///
/// For each layer and rank: the KD loss against the teacher (T² · KL at
/// --temperature, the KD term of `distill --loss kd`; the teacher's own is
/// 0) and top-1. Each layer's curve ends at its full rank, measured with
/// the layer dense (the teacher). A layer's own effective rank is the
/// smallest measured rank keeping --hi (and --lo) of the teacher's top-1.
/// The calibration split is --images training images at an even stride.
/// Writes analysis.json (the curves), summary.md (the table) and
/// heatmap.png (block x projection) to --out (default: sensitivity/ beside
/// the teacher).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct SensitivityArgs {
    /// The dense teacher checkpoint (any importable naming).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Ranks to factorize each layer at, comma-separated (each layer's
    /// ranks from its full rank up are left out; its full rank is added).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256,512"
    )]
    pub ranks: Vec<usize>,
    /// Training images in the calibration split.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub images: usize,
    #[command(flatten)]
    pub factor: FactorFlags,
    /// KD temperature T (as distill's --temperature).
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f32,
    /// Images per forward pass.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Lower fraction of the teacher's top-1 (a layer's r_lo).
    #[arg(long, default_value_t = 0.85)]
    pub lo: f64,
    /// Upper fraction of the teacher's top-1 (a layer's r_hi).
    #[arg(long, default_value_t = 0.95)]
    pub hi: f64,
    #[command(flatten)]
    pub import: ImportFlags,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Do not draw heatmap.png.
    #[arg(long)]
    pub no_plot: bool,
    /// The training data the split comes from and the input normalization
    /// and resize (default: the teacher's).
    #[command(flatten)]
    pub data: DataFlags,
    #[command(flatten)]
    pub compute: ComputeFlags,
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: SensitivityArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.temperature.is_nan() || args.temperature <= 0.0 {
        bail!("--temperature must be positive, got {}", args.temperature);
    }
    if !(0.0 < args.lo && args.lo <= args.hi && args.hi <= 1.0) {
        bail!(
            "--lo {} and --hi {} must satisfy 0 < lo <= hi <= 1",
            args.lo,
            args.hi
        );
    }
    if args.factor.from_teacher != FromTeacher::All {
        bail!("--from-teacher embeddings starts tensors fresh, which only training can use; the sensitivity pass measures the teacher's own layers");
    }
    dispatch(&args.compute.clone(), args.quiet, args)
}

impl WithBackend for SensitivityArgs {
    type Output = ();
    fn run<B: Backend>(self, be: &B, compute: &ComputeRecord) -> Result<()> {
        let teacher = load_model_with(&self.teacher, &self.import.options())?;
        if effrank_engine::model::params::is_lowrank(&teacher.ranks) {
            bail!(
                "{} is a low-rank student; the sensitivity pass needs a dense teacher",
                self.teacher.display()
            );
        }
        let Some(normalize) = self.data.normalize.or(teacher.normalize) else {
            bail!("{} does not record how its inputs are normalized: give --normalize cifar|imagenet|half|clip", self.teacher.display());
        };
        let choice = self.data.choose(
            teacher.run.as_ref().and_then(|r| r.data.as_ref()),
            ModelInput::of(&teacher, &self.data),
        );
        let (train, _, _) = load_data_for(&choice, self.quiet)?;
        let transform = transform_for(
            &teacher.cfg,
            &train,
            normalize,
            self.data.resize.or(teacher.resize),
        )?;
        let plan = self.factor.plan(0)?;
        if matches!(plan.init, FactorInit::Random { .. }) {
            bail!("--init random measures fresh factors, not the teacher's layers: use svd or svd-act");
        }
        let layers = plan.targets.ranks(&teacher.cfg, 1)?;
        let moments = match plan.init {
            FactorInit::SvdAct { calibration } => Some(calibrate(
                &teacher.cfg,
                &teacher.params,
                &layers,
                &train,
                &transform,
                calibration,
            )?),
            _ => None,
        };
        let probe = Probe::new(&train, &transform, self.images)?;
        let settings = SensitivitySettings {
            ranks: self.ranks.clone(),
            layers,
            init: plan.init,
            temperature: self.temperature,
            batch: self.batch,
            lo: self.lo,
            hi: self.hi,
        };
        let bar = progress(self.quiet);
        let subject = Subject {
            cfg: &teacher.cfg,
            params: &teacher.params,
            moments: moments.as_ref(),
        };
        let report = measure(
            be,
            compute.paths.model,
            subject,
            &probe,
            &settings,
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )?;
        bar.finish_and_clear();
        print_ranks(&report);
        let out = self.out.clone().unwrap_or_else(|| {
            self.teacher
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join("sensitivity")
        });
        create_folder(&out)?;
        write_sensitivity(&report, &out, !self.no_plot)?;
        println!(
            "{} layers x {} ranks on {} images in {:.1} s; written to {}",
            report.layers.len(),
            report.grid.len(),
            report.images,
            report.seconds,
            out.display()
        );
        Ok(())
    }
}

fn progress(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("sensitivity [{bar:30}] {pos}/{len} points, ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Each layer's own effective ranks: block by projection, r_hi/r_lo.
fn print_ranks(r: &SensitivityReport) {
    println!(
        "teacher top-1 on the split {:.2}%; each layer's own effective rank at {:.0}%/{:.0}% of it:",
        100.0 * r.teacher_top1,
        100.0 * r.hi,
        100.0 * r.lo
    );
    print!("{:<6}", "block");
    for l in BlockLinear::ALL {
        print!(" {:>9}", l.short());
    }
    println!();
    let depth = r.layers.iter().map(|l| l.block + 1).max().unwrap_or(0);
    for b in 0..depth {
        print!("{b:<6}");
        for l in BlockLinear::ALL {
            match r
                .layers
                .iter()
                .find(|x| x.block == b && x.layer == l.short())
            {
                Some(x) => print!(" {:>9}", format!("{}/{}", x.rank_hi, x.rank_lo)),
                None => print!(" {:>9}", "dense"),
            }
        }
        println!();
    }
}
