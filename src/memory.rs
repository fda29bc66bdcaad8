//! The memory plan: the bytes of every buffer a run will allocate, computed
//! from the config, the ranks, the batch, the precision and the loss before
//! anything is allocated, and checked against what the machine has.
//!
//! ```text
//! training  weights        P × 4                       (+ P_mat × 2: CUDA bf16 copies)
//!           gradients      P × 4 × shards              (a shard's own, added before AdamW)
//!           AdamW moments  P × 4 × 2
//!           saving state   P × 4 × 3 on the host        (weights and moments downloaded)
//!           activations    shards × acts(b)             b = ⌈micro-batch / shards⌉
//!           backward       shards × scratch(b)
//!           feature grads  shards × 2 × depth × b·T·D   (feature loss only)
//! teacher   live           weights + acts(micro)        (inference acts without the feature loss)
//!           cached         weights + acts(batch), and 4 epochs × n_train × classes × 4 on the host
//! host      data           the stored images (u8), a batch's bytes, the runtime
//! ```
//! `acts` and `scratch` count the buffers of `Vit::new_acts`,
//! `Vit::new_inference_acts` and `Vit::new_scratch` (`Activation` buffers at
//! 2 bytes in CUDA bf16, everything else at 4); the tests in
//! `tests/memory_plan.rs` hold them to the allocations made.
//!
//! On the CPU everything is host memory, checked against the memory the
//! operating system says is available (`MemAvailable`, and the cgroup's
//! limit when there is one) or `--memory-limit`; on CUDA the device parts
//! are checked against the GPU's free memory and the host parts against the
//! host's. A plan that does not fit is an error naming the need, the limit
//! and the largest batch that fits (`largest_batch`).

use crate::device::{DeviceKind, Precision};
use crate::model::params::{param_specs, Ranks};
use crate::model::VitConfig;
use anyhow::{bail, Context, Result};
use std::fmt;

/// Epochs of teacher logits a cache keeps in memory
/// (`train::teacher_cache`).
pub const CACHED_EPOCHS: usize = 4;

/// The process itself on the CPU: the binary, its libraries, thread stacks
/// and allocator slack, measured as the peak resident size of an `eval` of
/// the demo model (about 25 MiB on x86-64 Linux) with room to spare.
pub const RUNTIME_BYTES: u64 = 48 << 20;

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    Host,
    Device,
}

/// One line of a plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Part {
    pub what: String,
    pub place: Place,
    pub bytes: u64,
}

/// The buffers of a run, by part.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Plan {
    pub parts: Vec<Part>,
}

/// A model's shape and ranks.
#[derive(Clone, Copy)]
pub struct ModelShape<'a> {
    pub cfg: &'a VitConfig,
    pub ranks: &'a Ranks,
}

/// How a device stores buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Storage {
    pub device: DeviceKind,
    pub precision: Precision,
}

impl Storage {
    /// How `be` stores buffers.
    pub fn of<D: crate::device::Device>(be: &D) -> Storage {
        Storage {
            device: be.kind(),
            precision: be.precision(),
        }
    }

    fn activation_bytes(&self) -> u64 {
        match (self.device, self.precision) {
            (DeviceKind::Cuda, Precision::Bf16) => 2,
            _ => 4,
        }
    }
    /// Where the model's buffers live.
    fn place(&self) -> Place {
        match self.device {
            DeviceKind::Cpu => Place::Host,
            DeviceKind::Cuda => Place::Device,
        }
    }
}

/// Where a training run's teacher signal comes from.
#[derive(Clone, Copy)]
pub enum TeacherPlan<'a> {
    None,
    /// Run every step (`Frozen::for_loss` at the micro-batch).
    Live(ModelShape<'a>),
    /// Logits computed once per epoch by a teacher kept for it, at `batch`.
    Cached {
        teacher: ModelShape<'a>,
        batch: usize,
        train_images: usize,
        /// Caches held at once (a sweep keeps one per seed).
        caches: usize,
    },
}

/// A training run, as far as memory goes.
#[derive(Clone, Copy)]
pub struct TrainingRun<'a> {
    pub model: ModelShape<'a>,
    /// Images per optimizer step.
    pub batch: usize,
    /// Micro-batches per step (gradient accumulation; 1: none).
    pub micro_batches: usize,
    /// Parts a micro-batch is split into (`Trainer::shards_for`).
    pub shards: usize,
    pub feature_loss: bool,
    pub teacher: TeacherPlan<'a>,
    pub storage: Storage,
    /// Bytes of the stored images (training and test sets) on the host.
    pub data_bytes: u64,
    /// Bytes of one stored image.
    pub image_bytes: u64,
    /// Parameters the command holds on the host as loaded from files (the
    /// checkpoints the models were made from).
    pub loaded_params: u64,
}

/// Element counts of a buffer set: `Activation` buffers and the rest
/// (`Param`, `Statistic`), which a device may store at different widths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Elems {
    pub activation: u64,
    pub full: u64,
}

impl Elems {
    fn bytes(&self, s: &Storage) -> u64 {
        self.activation * s.activation_bytes() + self.full * 4
    }
    fn add(&mut self, o: Elems) {
        self.activation += o.activation;
        self.full += o.full;
    }
}

/// The elements of `Vit::new_acts(b)` (`slots` = depth) or
/// `Vit::new_inference_acts(b)` (`slots` = min(depth, 2)).
pub fn acts_elems(m: ModelShape, b: usize, slots: usize) -> Elems {
    let c = m.cfg;
    let (t, d) = (c.tokens() as u64, c.width as u64);
    let b = b as u64;
    let n = b * t;
    let mut e = Elems::default();
    for slot in 0..slots {
        e.activation += 10 * n * d + b * c.heads as u64 * t * t + 2 * n * c.mlp as u64;
        e.full += 4 * n;
        if c.family.layer_scale {
            // The projection's and fc2's outputs before LayerScale.
            e.activation += 2 * n * d;
        }
        for layer in crate::model::params::BlockLinear::ALL {
            let rank = m
                .ranks
                .iter()
                .skip(slot)
                .step_by(slots)
                .filter_map(|r| r[layer])
                .max();
            if let Some(r) = rank {
                e.activation += n * r as u64;
            }
        }
    }
    let np = b * c.n_patches() as u64;
    e.activation += b * (c.channels * c.image_size * c.image_size) as u64
        + np * c.patch_dim() as u64
        + np * d
        + n * d
        + 4 * b * d
        + b * c.heads as u64 * t
        + 2 * b * d
        + b * c.classes as u64;
    e.full += 2 * b;
    if c.family.norm_pre {
        e.activation += n * d;
        e.full += 2 * n;
    }
    let [pool_acts, pool_stats] =
        crate::model::pool::act_elems(c.family.pool, b as usize, c.tokens(), c.width, c.classes);
    e.activation += pool_acts as u64;
    e.full += pool_stats as u64;
    e
}

/// The elements of `Vit::new_scratch(b)`.
pub fn scratch_elems(m: ModelShape, b: usize) -> Elems {
    let c = m.cfg;
    let (t, d) = (c.tokens() as u64, c.width as u64);
    let b = b as u64;
    let n = b * t;
    let max_rank = m
        .ranks
        .iter()
        .flat_map(|r| r.values().flatten())
        .copied()
        .max()
        .unwrap_or(1) as u64;
    let norm_pre = if c.family.norm_pre { n * d } else { 0 };
    let pool = crate::model::pool::scratch_elems(
        c.family.pool,
        b as usize,
        c.tokens(),
        c.width,
        c.classes,
    ) as u64;
    Elems {
        activation: 7 * n * d
            + 2 * n * c.mlp as u64
            + n * max_rank
            + 5 * b * d
            + b * c.n_patches() as u64 * d
            + norm_pre
            + pool,
        full: 0,
    }
}

/// Parameters of a model, and those of its matrices (which CUDA copies to
/// bf16 for products in bf16 mode).
fn params(m: ModelShape) -> (u64, u64) {
    let specs = param_specs(m.cfg, m.ranks);
    let all = specs.iter().map(|s| s.numel() as u64).sum();
    let matrices = specs
        .iter()
        .filter(|s| s.decay)
        .map(|s| s.numel() as u64)
        .sum();
    (all, matrices)
}

/// Inference activations' blocks (`Vit::new_inference_acts`).
pub fn inference_slots(cfg: &VitConfig) -> usize {
    cfg.depth.min(2)
}

impl Plan {
    fn push(&mut self, what: impl Into<String>, place: Place, bytes: u64) {
        if bytes > 0 {
            self.parts.push(Part {
                what: what.into(),
                place,
                bytes,
            });
        }
    }

    /// Weights of a frozen or trained model, with CUDA's bf16 copies.
    fn weights(&mut self, what: &str, m: ModelShape, s: &Storage) {
        let (all, matrices) = params(m);
        self.push(format!("{what} weights"), s.place(), all * 4);
        if s.device == DeviceKind::Cuda && s.precision == Precision::Bf16 {
            self.push(
                format!("{what} weights' bf16 copies"),
                s.place(),
                matrices * 2,
            );
        }
    }

    /// A frozen model (`Frozen::new`, or `for_feature_loss` with
    /// `every_block`) for up to `batch` images.
    pub fn frozen(what: &str, m: ModelShape, batch: usize, every_block: bool, s: &Storage) -> Plan {
        let mut p = Plan::default();
        p.weights(what, m, s);
        let slots = if every_block {
            m.cfg.depth
        } else {
            inference_slots(m.cfg)
        };
        p.push(
            format!("{what} activations ({batch} images)"),
            s.place(),
            acts_elems(m, batch, slots).bytes(s),
        );
        p
    }

    /// Every buffer of a training run: its student's (`worker`) and what
    /// students of a sweep share (`shared`).
    pub fn training(r: &TrainingRun) -> Plan {
        let mut p = Plan::worker(r);
        p.extend(Plan::shared(r));
        p
    }

    /// What one student being trained holds: its model, gradients,
    /// optimizer, activations, a live teacher, a batch's images.
    pub fn worker(r: &TrainingRun) -> Plan {
        let s = &r.storage;
        let m = r.model;
        let mut p = Plan::default();
        p.weights("student", m, s);
        let (all, _) = params(m);
        p.push("gradients", s.place(), all * 4 * r.shards as u64);
        p.push("AdamW moments", s.place(), all * 4 * 2 + 4);
        // `train::state::save_train_state` downloads the weights and both
        // moments to write them.
        p.push("saving the training state", Place::Host, all * 4 * 3);
        let micro = r.batch.div_ceil(r.micro_batches.max(1));
        let per_shard = micro.div_ceil(r.shards.max(1));
        let shards = r.shards as u64;
        let c = m.cfg;
        let n = (per_shard * c.tokens() * c.width) as u64;
        let mut acts = acts_elems(m, per_shard, c.depth);
        // Loss buffers: the logits' gradient and the cached teacher logits
        // (Activation), the loss (Param).
        acts.add(Elems {
            activation: 2 * (per_shard * c.classes) as u64,
            full: 1,
        });
        p.push(
            format!("activations ({} x {per_shard} images)", r.shards),
            s.place(),
            shards * acts.bytes(s),
        );
        p.push(
            "backward scratch",
            s.place(),
            shards * scratch_elems(m, per_shard).bytes(s),
        );
        if r.feature_loss {
            let e = Elems {
                activation: 2 * c.depth as u64 * n,
                full: 0,
            };
            p.push("feature-loss gradients", s.place(), shards * e.bytes(s));
        }
        if let TeacherPlan::Live(t) = r.teacher {
            p.extend(Plan::frozen("teacher", t, micro, r.feature_loss, s));
        }
        p.push(
            "a batch's images",
            Place::Host,
            r.batch as u64 * r.image_bytes,
        );
        p
    }

    /// What the students of a sweep share: a teacher kept for cached
    /// logits and the logits, the checkpoints as loaded, the data, the
    /// process.
    pub fn shared(r: &TrainingRun) -> Plan {
        let s = &r.storage;
        let mut p = Plan::default();
        if let TeacherPlan::Cached {
            teacher,
            batch,
            train_images,
            caches,
        } = r.teacher
        {
            for _ in 0..caches {
                p.extend(Plan::frozen("teacher", teacher, batch, false, s));
                p.push(
                    format!("cached teacher logits ({CACHED_EPOCHS} epochs)"),
                    Place::Host,
                    (CACHED_EPOCHS * train_images * teacher.cfg.classes * 4) as u64,
                );
            }
        }
        p.push("checkpoints as loaded", Place::Host, r.loaded_params * 4);
        p.push("data (stored images)", Place::Host, r.data_bytes);
        p.push("runtime", Place::Host, RUNTIME_BYTES);
        p
    }

    /// Appends `other`'s parts.
    pub fn extend(&mut self, other: Plan) {
        self.parts.extend(other.parts);
    }

    pub fn total(&self, place: Place) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.place == place)
            .map(|p| p.bytes)
            .sum()
    }

    /// The bytes of every part whose name starts with `prefix`.
    pub fn bytes_of(&self, prefix: &str) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.what.starts_with(prefix))
            .map(|p| p.bytes)
            .sum()
    }

    /// Whether the plan fits `limits`; the first place that does not fit,
    /// with its need and limit.
    pub fn overflow(&self, limits: &Limits) -> Option<(Place, u64, u64)> {
        [Place::Device, Place::Host].into_iter().find_map(|place| {
            let need = self.total(place);
            let limit = limits.of(place)?;
            (need > limit).then_some((place, need, limit))
        })
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for place in [Place::Device, Place::Host] {
            let parts: Vec<_> = self.parts.iter().filter(|p| p.place == place).collect();
            if parts.is_empty() {
                continue;
            }
            let name = match place {
                Place::Device => "GPU",
                Place::Host => "host",
            };
            writeln!(f, "  {name} memory:")?;
            for p in parts {
                writeln!(f, "    {:<44} {:>12}", p.what, human(p.bytes))?;
            }
            writeln!(f, "    {:<44} {:>12}", "total", human(self.total(place)))?;
        }
        Ok(())
    }
}

/// What the machine has for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Host memory the run may use, and where the number comes from.
    pub host: Option<u64>,
    pub host_source: &'static str,
    /// The GPU's free memory (CUDA runs).
    pub device: Option<u64>,
}

impl Limits {
    fn of(&self, place: Place) -> Option<u64> {
        match place {
            Place::Host => self.host,
            Place::Device => self.device,
        }
    }

    /// The host's: `--memory-limit` when given, else what the operating
    /// system says is available. `device`: the GPU's free memory.
    pub fn detect(flag: Option<u64>, device: Option<u64>) -> Limits {
        let (host, host_source) = match flag {
            Some(b) => (Some(b), "--memory-limit"),
            None => match available_host_memory() {
                Some(b) => (Some(b), "available memory"),
                None => (None, "unknown"),
            },
        };
        Limits {
            host,
            host_source,
            device,
        }
    }
}

/// Memory left for students, per place, that a student reserves before it
/// starts and gives back when it ends: a sweep's workers wait for room
/// instead of starting a student that would not fit.
#[derive(Debug)]
pub struct Gate {
    capacity: [Option<u64>; 2],
    room: std::sync::Mutex<[Option<u64>; 2]>,
    freed: std::sync::Condvar,
}

/// Room reserved from a `Gate`, given back when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    gate: &'a Gate,
    need: [u64; 2],
}

fn slot(place: Place) -> usize {
    match place {
        Place::Host => 0,
        Place::Device => 1,
    }
}

impl Gate {
    /// A gate holding `room` (per place; `None`: unbounded).
    pub fn new(host: Option<u64>, device: Option<u64>) -> Gate {
        Gate {
            capacity: [host, device],
            room: std::sync::Mutex::new([host, device]),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Reserves `plan`'s bytes, waiting while others hold the room; an
    /// error when the plan is larger than the whole room.
    pub fn reserve(&self, plan: &Plan) -> Result<Reservation<'_>> {
        let need = [plan.total(Place::Host), plan.total(Place::Device)];
        for place in [Place::Host, Place::Device] {
            let i = slot(place);
            if let Some(cap) = self.capacity[i] {
                if need[i] > cap {
                    bail!(
                        "not enough memory for one student: it needs {} of {} memory, {} is left for students\n{plan}",
                        human(need[i]),
                        match place {
                            Place::Host => "host",
                            Place::Device => "GPU",
                        },
                        human(cap)
                    );
                }
            }
        }
        let fits = |room: &[Option<u64>; 2]| (0..2).all(|i| room[i].is_none_or(|r| need[i] <= r));
        let mut room = self
            .room
            .lock()
            .map_err(|_| anyhow::anyhow!("memory gate lock poisoned"))?;
        while !fits(&room) {
            room = self
                .freed
                .wait(room)
                .map_err(|_| anyhow::anyhow!("memory gate lock poisoned"))?;
        }
        for i in 0..2 {
            if let Some(r) = room[i].as_mut() {
                *r -= need[i];
            }
        }
        Ok(Reservation { gate: self, need })
    }

    /// How many plans of `plan`'s size fit at once.
    pub fn how_many(&self, plan: &Plan) -> usize {
        let need = [plan.total(Place::Host), plan.total(Place::Device)];
        (0..2)
            .filter_map(|i| Some(self.capacity[i]? / need[i].max(1)))
            .min()
            .map_or(usize::MAX, |k| k as usize)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut room) = self.gate.room.lock() {
            for i in 0..2 {
                if let Some(r) = room[i].as_mut() {
                    *r += self.need[i];
                }
            }
        }
        self.gate.freed.notify_all();
    }
}

/// The host memory available to this process: `MemAvailable` of
/// `/proc/meminfo`, less what the cgroup's `memory.max` leaves when that is
/// lower (a container or a Slurm job). `None` where neither can be read.
pub fn available_host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let available = meminfo
        .as_deref()
        .and_then(|m| meminfo_field(m, "MemAvailable"));
    let cgroup = cgroup_room();
    match (available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// `field` of `/proc/meminfo` text, in bytes.
fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// cgroup v2: `memory.max − memory.current` of this process's cgroup.
fn cgroup_room() -> Option<u64> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max": no limit
    let current: u64 = std::fs::read_to_string(dir.join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

/// The peak resident size of this process so far (`VmHWM`), in bytes;
/// `None` where `/proc` is not there.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    meminfo_field(&status, "VmHWM")
}

/// `1.5 GiB`, `320 MiB`, `12 KiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", (b / 1024.0).ceil())
    }
}

/// A size as given on the command line: bytes, or with a unit (`K`, `M`,
/// `G`, `T`, with or without `iB`/`B`; powers of 1024): `8G`, `512MiB`.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("'{text}' is not a size (e.g. 8G, 512MiB, 1000000)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => bail!("'{text}': unknown size unit '{other}' (use K, M, G or T)"),
    };
    if !(value.is_finite() && value > 0.0) {
        bail!("'{text}': a size must be positive");
    }
    Ok((value * scale as f64) as u64)
}

/// The largest batch in `1..=batch` whose plan (`plan_for(b)`) fits
/// `limits`; `None` when not even one image fits. Plans grow with the
/// batch, so a binary search finds it.
pub fn largest_batch(
    batch: usize,
    limits: &Limits,
    plan_for: impl Fn(usize) -> Plan,
) -> Option<usize> {
    if plan_for(1).overflow(limits).is_some() {
        return None;
    }
    let (mut lo, mut hi) = (1, batch);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if plan_for(mid).overflow(limits).is_none() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5 GB").unwrap(), 3 << 29);
        for bad in ["", "G", "-1G", "3 parsecs", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable"), Some(1_024_000));
        assert_eq!(meminfo_field(text, "MemFree"), None);
    }

    #[test]
    fn the_largest_batch_is_the_last_that_fits() {
        let limits = Limits {
            host: Some(1000),
            host_source: "test",
            device: None,
        };
        let plan = |b: usize| Plan {
            parts: vec![Part {
                what: "x".into(),
                place: Place::Host,
                bytes: 100 + 7 * b as u64,
            }],
        };
        assert_eq!(largest_batch(500, &limits, plan), Some(128));
        assert_eq!(largest_batch(50, &limits, plan), Some(50));
        let tiny = Limits {
            host: Some(10),
            ..limits
        };
        assert_eq!(largest_batch(50, &tiny, plan), None);
    }
}
