//! Performance accounting: what the CUDA device's profiling mode
//! (`--profile`, `device::cuda`) and the GPU benches report.
//!
//! - `Work`: the least an op call must do (METHOD.md's two numbers): bytes
//!   through device memory (each input read once, each output written once)
//!   and floating-point operations, computed from the shapes the op's
//!   checked entry point was called with (`src/ops/<op>/mod.rs`).
//! - `OpTable`: device time, calls and work summed per op name.
//! - `breakdown`: a step's per-op rows against `Ceilings` measured in the
//!   same run (a large device-to-device copy, a large matrix product): share
//!   of the step, achieved GB/s and TFLOP/s, and the fraction of the
//!   roofline, `max(bytes / copy rate, flops / GEMM rate) / measured time`.
//! - `Protocol` and `project`: measured step rates turned into GPU-hours of
//!   the reference protocol (`docs/method.md`).
//!
//! Nothing here touches a device, so all of it is tested on the CPU.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The least work of one op call: bytes moved and floating-point operations.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub bytes: f64,
    pub flops: f64,
}

impl Work {
    pub fn new(bytes: f64, flops: f64) -> Self {
        Work { bytes, flops }
    }
}

impl std::ops::Add for Work {
    type Output = Work;
    fn add(self, o: Work) -> Work {
        Work {
            bytes: self.bytes + o.bytes,
            flops: self.flops + o.flops,
        }
    }
}

/// Every call of one op, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTotals {
    pub calls: u64,
    pub seconds: f64,
    pub work: Work,
}

/// Device time, calls and work per op name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpTable {
    ops: BTreeMap<&'static str, OpTotals>,
}

impl OpTable {
    /// Adds one call of `op` that took `seconds` of device time.
    pub fn record(&mut self, op: &'static str, seconds: f64, work: Work) {
        let t = self.ops.entry(op).or_default();
        t.calls += 1;
        t.seconds += seconds;
        t.work = t.work + work;
    }
    pub fn get(&self, op: &str) -> Option<&OpTotals> {
        self.ops.get(op)
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// Device time of every recorded call.
    pub fn total_seconds(&self) -> f64 {
        self.ops.values().map(|t| t.seconds).sum()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &OpTotals)> {
        self.ops.iter().map(|(k, v)| (*k, v))
    }
}

/// Ceilings measured on the device in the same run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// Device-to-device copy, bytes read plus bytes written per second.
    pub copy_bytes_per_s: f64,
    /// A large matrix product in the device's precision, FLOP per second.
    pub gemm_flops_per_s: f64,
}

impl Ceilings {
    /// The roofline time of `work`: the larger of its memory and arithmetic times.
    pub fn floor_seconds(&self, work: Work) -> f64 {
        (work.bytes / self.copy_bytes_per_s).max(work.flops / self.gemm_flops_per_s)
    }
    /// Whether `work` is memory- or arithmetic-bound on these ceilings.
    pub fn bound(&self, work: Work) -> Bound {
        if work.flops / self.gemm_flops_per_s > work.bytes / self.copy_bytes_per_s {
            Bound::Compute
        } else {
            Bound::Memory
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Memory,
    Compute,
}

/// One op's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The op name; `OTHER` for the step's device time outside every op call.
    pub op: String,
    pub calls_per_step: f64,
    pub seconds_per_step: f64,
    /// Of the step's device time.
    pub share: f64,
    pub work_per_step: Work,
    pub bytes_per_s: f64,
    pub flops_per_s: f64,
    /// Roofline time over measured time (1 = at the ceiling).
    pub roofline_fraction: f64,
    pub bound: Bound,
}

/// The row of the step's time outside every profiled op call: device
/// copies and uploads inside an op are counted with the op, those outside
/// (and gaps between launches, and ops without a profile span) here.
pub const OTHER: &str = "(outside op calls)";

/// Per-op rows of a step from `table`, summed over `steps` steps whose
/// device time was `step_seconds` each, slowest first, then `OTHER`.
pub fn breakdown(
    table: &OpTable,
    steps: usize,
    step_seconds: f64,
    ceilings: &Ceilings,
) -> Vec<Row> {
    let n = steps.max(1) as f64;
    let mut rows: Vec<Row> = table
        .iter()
        .map(|(op, t)| {
            let (s, w) = (t.seconds / n, Work::new(t.work.bytes / n, t.work.flops / n));
            Row {
                op: op.to_string(),
                calls_per_step: t.calls as f64 / n,
                seconds_per_step: s,
                share: s / step_seconds,
                work_per_step: w,
                bytes_per_s: w.bytes / s,
                flops_per_s: w.flops / s,
                roofline_fraction: ceilings.floor_seconds(w) / s,
                bound: ceilings.bound(w),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.seconds_per_step.total_cmp(&a.seconds_per_step));
    let other = (step_seconds - table.total_seconds() / n).max(0.0);
    rows.push(Row {
        op: OTHER.into(),
        calls_per_step: 0.0,
        seconds_per_step: other,
        share: other / step_seconds,
        work_per_step: Work::default(),
        bytes_per_s: 0.0,
        flops_per_s: 0.0,
        roofline_fraction: 0.0,
        bound: Bound::Memory,
    });
    rows
}

/// The rows as a text table (ms, share, MB, GFLOP, GB/s, TFLOP/s, roofline fraction).
pub fn format_breakdown(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<26} {:>7} {:>9} {:>6} {:>9} {:>9} {:>8} {:>8} {:>9}\n",
        "op", "calls", "ms", "share", "MB", "GFLOP", "GB/s", "TFLOP/s", "roofline"
    );
    for r in rows {
        if r.op == OTHER {
            let _ = writeln!(
                s,
                "{:<26} {:>7} {:>9.3} {:>5.1}%",
                r.op,
                "",
                r.seconds_per_step * 1e3,
                100.0 * r.share
            );
            continue;
        }
        let bound = match r.bound {
            Bound::Memory => "mem",
            Bound::Compute => "gemm",
        };
        let _ = writeln!(
            s,
            "{:<26} {:>7.0} {:>9.3} {:>5.1}% {:>9.1} {:>9.2} {:>8.0} {:>8.1} {:>5.0}% {bound}",
            r.op,
            r.calls_per_step,
            r.seconds_per_step * 1e3,
            100.0 * r.share,
            r.work_per_step.bytes / 1e6,
            r.work_per_step.flops / 1e9,
            r.bytes_per_s / 1e9,
            r.flops_per_s / 1e12,
            100.0 * r.roofline_fraction
        );
    }
    s
}

/// Whole-run totals as a text table, slowest first (what a profiled
/// command prints at exit): calls, ms, MB, GFLOP, achieved GB/s and TFLOP/s.
pub fn format_totals(table: &OpTable) -> String {
    let mut ops: Vec<_> = table.iter().collect();
    ops.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let mut s = format!(
        "{:<26} {:>8} {:>10} {:>6} {:>10} {:>10} {:>8} {:>8}\n",
        "op", "calls", "ms", "share", "MB", "GFLOP", "GB/s", "TFLOP/s"
    );
    let total = table.total_seconds();
    for (op, t) in ops {
        let _ = writeln!(
            s,
            "{op:<26} {:>8} {:>10.3} {:>5.1}% {:>10.1} {:>10.2} {:>8.0} {:>8.1}",
            t.calls,
            t.seconds * 1e3,
            100.0 * t.seconds / total,
            t.work.bytes / 1e6,
            t.work.flops / 1e9,
            t.work.bytes / t.seconds / 1e9,
            t.work.flops / t.seconds / 1e12
        );
    }
    s
}

/// The reference protocol as a workload (`docs/method.md`): a teacher
/// trained `teacher_epochs`, then one student per rank trained
/// `student_epochs`, each epoch over `train_images`, each run evaluated once
/// on `test_images` (the engine's default: the last epoch only).
#[derive(Clone, Debug, PartialEq)]
pub struct Protocol {
    pub teacher_epochs: usize,
    pub student_epochs: usize,
    pub ranks: Vec<usize>,
    pub train_images: usize,
    pub test_images: usize,
    pub teacher_batch: usize,
    pub student_batch: usize,
}

impl Protocol {
    /// Teacher 20 epochs at batch 32; 16 ranks x 200 epochs at batch 24; CIFAR-100.
    pub fn reference() -> Self {
        Protocol {
            teacher_epochs: 20,
            student_epochs: 200,
            ranks: vec![
                2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
            ],
            train_images: 50_000,
            test_images: 10_000,
            teacher_batch: 32,
            student_batch: 24,
        }
    }
}

/// GPU-hours of a protocol, by part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Projection {
    pub teacher_hours: f64,
    pub student_hours: f64,
    pub eval_hours: f64,
}

impl Projection {
    pub fn total_hours(&self) -> f64 {
        self.teacher_hours + self.student_hours + self.eval_hours
    }
}

/// GPU-hours of `p` from measured rates (images per second): the teacher's
/// training step, a student's step at a rank (`student_rate`), inference.
pub fn project(
    p: &Protocol,
    teacher_rate: f64,
    student_rate: impl Fn(usize) -> f64,
    eval_rate: f64,
) -> Projection {
    let hours = |images: f64, rate: f64| images / rate / 3600.0;
    let epoch = p.train_images as f64;
    let teacher_hours = hours(p.teacher_epochs as f64 * epoch, teacher_rate);
    let student_hours = p
        .ranks
        .iter()
        .map(|&r| hours(p.student_epochs as f64 * epoch, student_rate(r)))
        .sum();
    let eval_hours = hours(((1 + p.ranks.len()) * p.test_images) as f64, eval_rate);
    Projection {
        teacher_hours,
        student_hours,
        eval_hours,
    }
}

/// The rate at rank `r` from rates measured at some ranks: linear between
/// the two nearest measured ranks, the nearest measured one outside their
/// range. `None` when nothing was measured.
pub fn interpolate(points: &[(usize, f64)], r: usize) -> Option<f64> {
    let mut pts = points.to_vec();
    pts.sort_by_key(|p| p.0);
    let (first, last) = (*pts.first()?, *pts.last()?);
    if r <= first.0 {
        return Some(first.1);
    }
    if r >= last.0 {
        return Some(last.1);
    }
    let i = pts.iter().position(|p| p.0 >= r)?;
    let (a, b) = (pts[i - 1], pts[i]);
    let t = (r - a.0) as f64 / (b.0 - a.0) as f64;
    Some(a.1 + t * (b.1 - a.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CEIL: Ceilings = Ceilings {
        copy_bytes_per_s: 4e12,
        gemm_flops_per_s: 800e12,
    };

    #[test]
    fn the_table_sums_calls_time_and_work_per_op() {
        let mut t = OpTable::default();
        t.record("gelu_forward", 0.5e-3, Work::new(100.0, 10.0));
        t.record("gelu_forward", 1.5e-3, Work::new(300.0, 30.0));
        t.record("matmul", 2.0e-3, Work::new(1.0, 2.0));
        let g = t.get("gelu_forward").unwrap();
        assert_eq!((g.calls, g.work), (2, Work::new(400.0, 40.0)));
        assert!((g.seconds - 2e-3).abs() < 1e-15);
        assert!((t.total_seconds() - 4e-3).abs() < 1e-15);
        assert!(t.get("add").is_none());
    }

    #[test]
    fn the_roofline_is_the_larger_of_the_memory_and_arithmetic_times() {
        // 4 GB at 4 TB/s: 1 ms; 80 GFLOP at 800 TFLOP/s: 0.1 ms.
        let w = Work::new(4e9, 80e9);
        assert!((CEIL.floor_seconds(w) - 1e-3).abs() < 1e-12);
        assert_eq!(CEIL.bound(w), Bound::Memory);
        let g = Work::new(4e6, 8e12);
        assert!((CEIL.floor_seconds(g) - 1e-2).abs() < 1e-12);
        assert_eq!(CEIL.bound(g), Bound::Compute);
    }

    #[test]
    fn a_breakdown_divides_by_steps_sorts_and_names_the_rest() {
        let mut t = OpTable::default();
        // Two steps: layernorm 2 x 1 ms moving 2 x 2 GB (at 4 TB/s: 0.5 ms
        // each, half the roofline); matmul 2 x 4 ms doing 2 x 1.6 TFLOP
        // (2 ms each at 800 TFLOP/s: half).
        for _ in 0..2 {
            t.record("layernorm_forward", 1e-3, Work::new(2e9, 0.0));
            t.record("matmul", 4e-3, Work::new(1e8, 1.6e12));
        }
        let rows = breakdown(&t, 2, 10e-3, &CEIL);
        assert_eq!(
            rows.iter().map(|r| r.op.as_str()).collect::<Vec<_>>(),
            ["matmul", "layernorm_forward", OTHER]
        );
        let (m, l, o) = (&rows[0], &rows[1], &rows[2]);
        assert_eq!(m.calls_per_step, 1.0);
        assert!((m.seconds_per_step - 4e-3).abs() < 1e-12 && (m.share - 0.4).abs() < 1e-9);
        assert!(
            (m.flops_per_s - 400e12).abs() < 1e3
                && (m.roofline_fraction - 0.5).abs() < 1e-9
                && m.bound == Bound::Compute
        );
        assert!(
            (l.bytes_per_s - 2e12).abs() < 1e3
                && (l.roofline_fraction - 0.5).abs() < 1e-9
                && l.bound == Bound::Memory
        );
        // 10 ms step, 5 ms in ops.
        assert!((o.seconds_per_step - 5e-3).abs() < 1e-12 && (o.share - 0.5).abs() < 1e-9);
        let text = format_breakdown(&rows);
        assert!(
            text.contains("matmul") && text.contains("50%") && text.contains(OTHER),
            "{text}"
        );
        let totals = format_totals(&t);
        assert!(
            totals.lines().nth(1).unwrap().starts_with("matmul"),
            "{totals}"
        );
        assert!(
            totals.contains("80.0%") && totals.contains("400.0"),
            "{totals}"
        );
    }

    #[test]
    fn the_rest_is_never_negative() {
        let mut t = OpTable::default();
        t.record("add", 2e-3, Work::new(1.0, 0.0));
        assert_eq!(
            breakdown(&t, 1, 1e-3, &CEIL)
                .last()
                .unwrap()
                .seconds_per_step,
            0.0
        );
    }

    #[test]
    fn rates_between_measured_ranks_are_linear_and_clamped_outside() {
        let pts = [(64, 600.0), (16, 1000.0), (128, 400.0)];
        assert_eq!(interpolate(&pts, 2), Some(1000.0));
        assert_eq!(interpolate(&pts, 16), Some(1000.0));
        assert_eq!(interpolate(&pts, 40), Some(800.0));
        assert_eq!(interpolate(&pts, 96), Some(500.0));
        assert_eq!(interpolate(&pts, 256), Some(400.0));
        assert_eq!(interpolate(&[], 8), None);
    }

    #[test]
    fn the_reference_protocol_in_hours() {
        let p = Protocol::reference();
        assert_eq!(p.ranks.len(), 16);
        // Teacher: 20 x 50,000 images at 1,000 images/s = 1,000 s.
        // Students: 16 x 200 x 50,000 at 2,000 images/s = 80,000 s.
        // Evaluation: 17 x 10,000 at 17,000 images/s = 10 s.
        let h = project(&p, 1000.0, |_| 2000.0, 17_000.0);
        assert!((h.teacher_hours - 1000.0 / 3600.0).abs() < 1e-12);
        assert!((h.student_hours - 80_000.0 / 3600.0).abs() < 1e-9);
        assert!((h.eval_hours - 10.0 / 3600.0).abs() < 1e-12);
        assert!((h.total_hours() - 81_010.0 / 3600.0).abs() < 1e-9);
        // A rate per rank is used rank by rank.
        let by_rank = project(
            &p,
            1000.0,
            |r| if r <= 128 { 2000.0 } else { 1000.0 },
            17_000.0,
        );
        assert!((by_rank.student_hours - (12.0 * 5000.0 + 4.0 * 10_000.0) / 3600.0).abs() < 1e-9);
    }
}
