//! The CPU device: fp32 `Vec<f32>` buffers, and rayon's thread pool, on
//! which every CPU op body (`src/ops/<op>/cpu.rs`) runs its parallel loops.
//! It is the reference every CUDA kernel is tested against, and
//! deterministic: the same inputs give the same bits whatever the thread
//! count.

use super::{check_len, BufKind, Device, DeviceKind, Precision, Work};
use crate::perf::OpTable;
use anyhow::{anyhow, Result};
use std::cell::Cell;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Elements of the buffers a thread has allocated through `Cpu`, by kind:
/// what the memory plan's tests (`tests/memory_plan.rs`) hold the plan to,
/// and, with CUDA's storage rule applied to the kinds, the CUDA plan too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    pub param: u64,
    pub activation: u64,
    pub statistic: u64,
}

thread_local! {
    static ALLOCATED: Cell<Allocated> = const {
        Cell::new(Allocated { param: 0, activation: 0, statistic: 0 })
    };
}

fn count_allocation(len: usize, kind: BufKind) {
    ALLOCATED.with(|a| {
        let mut n = a.get();
        match kind {
            BufKind::Param => n.param += len as u64,
            BufKind::Activation => n.activation += len as u64,
            BufKind::Statistic => n.statistic += len as u64,
        }
        a.set(n);
    });
}

/// What this thread has allocated through `Cpu` so far.
pub fn allocated_on_this_thread() -> Allocated {
    ALLOCATED.with(|a| a.get())
}

impl Allocated {
    /// Elements allocated since `before`.
    pub fn since(self, before: Allocated) -> Allocated {
        Allocated {
            param: self.param - before.param,
            activation: self.activation - before.activation,
            statistic: self.statistic - before.statistic,
        }
    }
}

/// The CPU reference device.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Runs `f` on one of rayon's worker threads and returns its result (runs it
/// in place when already on one). The CPU ops are parallel loops; started
/// from a thread outside the pool, such as the program's main thread, each
/// one hands its work to the pool and puts the caller to sleep until it is
/// done, two thread wake-ups per operation and hundreds per forward pass.
/// Started on a worker, the caller takes part in its own loop. The command
/// line and the benches run their work through this (a few percent on the
/// ViT-B/32 forward at batch 8, within this machine's run-to-run noise, so
/// no number is claimed).
pub fn on_worker_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

/// Stack size of every rayon worker the engine starts: whole commands run
/// on a worker (`on_worker_thread`), which then needs the main thread's.
pub const WORKER_STACK_BYTES: usize = 8 << 20;

/// A rayon pool of `threads` workers, each with `WORKER_STACK_BYTES` of
/// stack (a sweep worker's pool, a shard's, a borrowed thread's).
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(WORKER_STACK_BYTES)
        .build()
        .map_err(|e| anyhow!("creating a pool of {threads} thread(s): {e}"))
}

static PROFILING: OnceLock<bool> = OnceLock::new();

/// Switch the CPU's op profile on or off for this process (`--profile`);
/// off unless switched on before the first op.
pub fn set_profiling(on: bool) -> Result<()> {
    super::set_once(&PROFILING, on, "the CPU op profile (--profile)")
}

/// The CPU's op profile (`--profile`): wall time of every outermost op
/// call on every thread, summed per op (with several students at once,
/// thread time, which can exceed the wall time). None when off.
fn profile() -> Option<&'static Mutex<OpTable>> {
    static TABLE: OnceLock<Mutex<OpTable>> = OnceLock::new();
    PROFILING
        .get_or_init(|| false)
        .then(|| TABLE.get_or_init(|| Mutex::new(OpTable::default())))
}

thread_local! {
    /// Depth of op calls open on this thread, and when the outermost began.
    static OPEN: Cell<(usize, Option<Instant>)> = const { Cell::new((0, None)) };
}

/// A zero or copy, profiled as an op of its own when profiling is on.
fn profiled_memory(cpu: &Cpu, op: &'static str, work: Work, f: impl FnOnce()) -> Result<()> {
    if profile().is_none() {
        f();
        return Ok(());
    }
    cpu.op_begin(op)?;
    f();
    cpu.op_end(op, work)
}

/// The CPU's op profile so far, emptied (None when profiling is off).
pub fn take_profile() -> Option<OpTable> {
    profile().map(|p| std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner())))
}

impl Device for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn precision(&self) -> Precision {
        Precision::F32
    }
    fn independent_workers(&self) -> usize {
        rayon::current_num_threads()
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }
    fn alloc(&self, len: usize, kind: BufKind) -> Result<Vec<f32>> {
        count_allocation(len, kind);
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| {
            anyhow!(
                "out of host memory allocating {len} floats ({:.1} GiB)",
                len as f64 * 4.0 / (1u64 << 30) as f64
            )
        })?;
        v.resize(len, 0.0);
        Ok(v)
    }
    fn upload(&self, host: &[f32], kind: BufKind) -> Result<Vec<f32>> {
        count_allocation(host.len(), kind);
        Ok(host.to_vec())
    }
    fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        check_len("write", buf.len(), host.len())?;
        buf[..host.len()].copy_from_slice(host);
        Ok(())
    }
    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn zero(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        check_len("zero", buf.len(), len)?;
        profiled_memory(self, "zero", Work::new(4.0 * len as f64, 0.0), || {
            buf[..len].fill(0.0)
        })
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<()> {
        check_len("copy dst", dst.len(), len)?;
        check_len("copy src", src.len(), len)?;
        profiled_memory(self, "copy", Work::new(8.0 * len as f64, 0.0), || {
            dst[..len].copy_from_slice(&src[..len])
        })
    }
    fn element_bytes(&self, _buf: &Vec<f32>) -> usize {
        4
    }
    fn profiling(&self) -> bool {
        profile().is_some()
    }
    fn op_begin(&self, _op: &'static str) -> Result<()> {
        OPEN.with(|o| {
            let (depth, start) = o.get();
            o.set((
                depth + 1,
                if depth == 0 {
                    Some(Instant::now())
                } else {
                    start
                },
            ));
        });
        Ok(())
    }
    fn op_end(&self, op: &'static str, work: Work) -> Result<()> {
        let (depth, start) = OPEN.with(|o| o.get());
        let depth = depth
            .checked_sub(1)
            .ok_or_else(|| anyhow!("profile: {op} ended without a start"))?;
        OPEN.with(|o| o.set((depth, if depth == 0 { None } else { start })));
        if let (0, Some(start), Some(table)) = (depth, start, profile()) {
            table.lock().unwrap_or_else(|e| e.into_inner()).record(
                op,
                start.elapsed().as_secs_f64(),
                work,
            );
        }
        Ok(())
    }
}
