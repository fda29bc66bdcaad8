//! The memory plan at the command line: `--accumulate auto` resolved,
//! `--dry-run` printed, and a run that does not fit refused before anything
//! is allocated (`effrank_engine::memory` has the plan itself).

use super::common::{Accumulate, MemoryFlags};
use anyhow::{bail, Result};
use effrank_engine::data::Dataset;
use effrank_engine::device::Device;
use effrank_engine::memory::{human, largest_batch, Limits, Place, Plan};
use effrank_engine::train::FitSummary;

/// Bytes a training and a test set hold in memory (`Dataset::held_bytes`).
pub fn data_bytes(train: &Dataset, test: &Dataset) -> u64 {
    train.held_bytes() + test.held_bytes()
}

/// ", peak memory 1.2 GiB" for a run's summary line (empty where the peak
/// could not be read).
pub fn peak_note(summary: &FitSummary) -> String {
    summary
        .peak_host_bytes
        .map(|b| format!(", peak memory {}", human(b)))
        .unwrap_or_default()
}

/// What the plan decided for a run.
pub enum Planned {
    /// Train with this many micro-batches per step.
    Go { micro_batches: usize },
    /// `--dry-run`: the plan was printed; stop.
    DryRun,
}

/// The limits of `be`'s machine under `flags`: the GPU's free memory only
/// with `--check-gpu-memory` (`MemoryFlags`).
pub fn limits<D: Device>(be: &D, flags: &MemoryFlags) -> Result<Limits> {
    let device = if flags.check_gpu_memory {
        be.free_memory()?
    } else {
        None
    };
    Ok(Limits::detect(flags.memory_limit, device))
}

/// Plans a training run of `batch` images per step, `plan_for(batch,
/// micro_batches)` giving its plan: resolves `--accumulate` (auto: the
/// fewest micro-batches that fit), prints the plan for `--dry-run`, and
/// refuses a run that does not fit with the need, the limit, and the
/// largest batch (or the micro-batches) that would.
pub fn plan_training<D: Device>(
    be: &D,
    flags: &MemoryFlags,
    batch: usize,
    accumulate: Accumulate,
    quiet: bool,
    plan_for: impl Fn(usize, usize) -> Plan,
) -> Result<Planned> {
    let limits = limits(be, flags)?;
    let micro_batches = match accumulate {
        Accumulate::MicroBatches(n) => n,
        Accumulate::Auto => fewest_micro_batches(batch, &limits, &plan_for).unwrap_or(batch),
    };
    let plan = plan_for(batch, micro_batches);
    if flags.dry_run {
        println!(
            "memory plan: batch {batch} in {micro_batches} micro-batch(es) of up to {} images",
            batch.div_ceil(micro_batches)
        );
        print!("{plan}");
        println!("{}", describe_limits(&limits));
        match plan.overflow(&limits) {
            None => println!("fits"),
            Some((place, need, limit)) => println!(
                "does not fit: {} needs {}, {} available",
                place_name(place),
                human(need),
                human(limit)
            ),
        }
        return Ok(Planned::DryRun);
    }
    if let Some((place, need, limit)) = plan.overflow(&limits) {
        let fits = largest_batch(batch, &limits, |b| plan_for(b, micro_batches.min(b)));
        let micro = fewest_micro_batches(batch, &limits, &plan_for);
        let mut advice = Vec::new();
        if let Some(b) = fits {
            advice.push(format!("the largest batch that fits is {b}"));
        }
        if let Some(m) = micro.filter(|&m| m > micro_batches) {
            advice.push(format!(
                "--batch {batch} fits as --accumulate {m} (or --accumulate auto)"
            ));
        }
        if advice.is_empty() {
            advice.push("not even a batch of one image fits".into());
        }
        bail!(
            "not enough memory: this run needs {} of {} memory and {} is available ({}); {}.\n{plan}(--dry-run prints this plan without training)",
            human(need),
            place_name(place),
            human(limit),
            limits.host_source,
            advice.join("; ")
        );
    }
    if !quiet {
        eprintln!(
            "memory: {} planned{}",
            summary(&plan),
            if micro_batches > 1 {
                format!(
                    ", batch {batch} as {micro_batches} micro-batches of up to {}",
                    batch.div_ceil(micro_batches)
                )
            } else {
                String::new()
            }
        );
    }
    Ok(Planned::Go { micro_batches })
}

/// The fewest micro-batches (1..=batch) with which a batch of `batch`
/// fits; `None` when even one image at a time does not.
fn fewest_micro_batches(
    batch: usize,
    limits: &Limits,
    plan_for: &impl Fn(usize, usize) -> Plan,
) -> Option<usize> {
    // Distinct micro-batch sizes, largest first: the micro-batch of m
    // micro-batches is ⌈batch/m⌉, so search the size and take the fewest
    // micro-batches that give it.
    let size = largest_batch(batch, limits, |micro| {
        plan_for(batch, batch.div_ceil(micro))
    })?;
    Some(batch.div_ceil(size))
}

fn place_name(place: Place) -> &'static str {
    match place {
        Place::Host => "host",
        Place::Device => "GPU",
    }
}

/// "host 1.2 GiB" or "GPU 10.3 GiB + host 2.1 GiB".
fn summary(plan: &Plan) -> String {
    [Place::Device, Place::Host]
        .into_iter()
        .filter(|&p| plan.total(p) > 0)
        .map(|p| format!("{} {}", place_name(p), human(plan.total(p))))
        .collect::<Vec<_>>()
        .join(" + ")
}

fn describe_limits(l: &Limits) -> String {
    let host = match l.host {
        Some(b) => format!("host {} ({})", human(b), l.host_source),
        None => "host: unknown".into(),
    };
    match l.device {
        Some(b) => format!("available: GPU {} free, {host}", human(b)),
        None => format!("available: {host}"),
    }
}
