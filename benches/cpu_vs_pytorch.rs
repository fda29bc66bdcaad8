//! The engine against PyTorch + timm on the CPU, paired round by round.
//!
//!     pip install --target /tmp/torchdeps torch timm
//!     PYTHONPATH=/tmp/torchdeps cargo bench --bench cpu_vs_pytorch
//!
//! The workloads of `benches/cpu.rs` (vit-cifar training step at batch 64,
//! on the class-token tail and with every token;
//! ViT-B/32 forward at batch 8, both the engine's inference path and its
//! every-token forward), each against the same work in PyTorch, which runs
//! in a child process (`scripts/bench_pytorch_cpu.py --serve`) at the same
//! thread count. Shared machines drift by tens of percent from one minute
//! to the next, so separate runs of the two cannot be compared; here each
//! round times a few iterations of one side and then of the other, a few
//! seconds apart, the order swapping every round, and the ratio is taken
//! per round. Prints, per workload, the median images/s of each side and
//! the median ratio with its quartiles.
//!
//! Environment: `EFFRANK_PAIRED_ROUNDS` (default 15), `PYTHON` (default
//! `python3`), and rayon's `RAYON_NUM_THREADS` for the thread count. Where
//! PyTorch cannot be started the bench prints why and skips itself; an error
//! after the start fails it.

mod common;

use common::{Forward, TrainStep};
use effrank_engine::device::cpu::on_worker_thread;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

/// Iterations of each side per round, and before the first round.
const ITERS_PER_ROUND: usize = 2;
const WARMUP_ITERS: usize = 2;

/// The PyTorch side: a child process answering "NAME N" with seconds per run.
struct PyTorch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PyTorch {
    fn start(threads: usize) -> Result<Self, String> {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_pytorch_cpu.py");
        let mut child = Command::new(&python)
            .args([script, "--serve", "--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {python}: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut py = PyTorch {
            child,
            stdin,
            stdout,
        };
        match py.read_line()?.as_str() {
            "ready" => Ok(py),
            other => Err(format!(
                "{script} --serve said {other:?} instead of \"ready\""
            )),
        }
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the PyTorch process ended (is torch importable? pip install --target /tmp/torchdeps torch timm, then PYTHONPATH=/tmp/torchdeps)".into());
        }
        Ok(line.trim().to_string())
    }

    /// Mean seconds per iteration of `n` iterations of `workload`.
    fn time(&mut self, workload: &str, n: usize) -> Result<f64, String> {
        writeln!(self.stdin, "{workload} {n}").map_err(|e| e.to_string())?;
        let line = self.read_line()?;
        line.parse()
            .map_err(|_| format!("PyTorch answered {line:?} to \"{workload} {n}\""))
    }
}

impl Drop for PyTorch {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

/// Mean seconds per iteration of `n` calls of `f`, on a rayon worker as the
/// command line runs.
fn engine_time(n: usize, f: &mut (dyn FnMut() + Send)) -> f64 {
    on_worker_thread(|| {
        let t0 = Instant::now();
        for _ in 0..n {
            f();
        }
        t0.elapsed().as_secs_f64() / n as f64
    })
}

fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

/// Alternating rounds of one workload; prints its line of the table.
fn paired(
    py: &mut PyTorch,
    name: &str,
    py_workload: &str,
    images: usize,
    rounds: usize,
    engine: &mut (dyn FnMut() + Send),
) -> Result<(), String> {
    engine_time(WARMUP_ITERS, engine);
    py.time(py_workload, WARMUP_ITERS)?;
    let (mut ours, mut theirs, mut ratios) = (vec![], vec![], vec![]);
    for round in 0..rounds {
        let (e, p) = if round % 2 == 0 {
            let e = engine_time(ITERS_PER_ROUND, engine);
            (e, py.time(py_workload, ITERS_PER_ROUND)?)
        } else {
            let p = py.time(py_workload, ITERS_PER_ROUND)?;
            (engine_time(ITERS_PER_ROUND, engine), p)
        };
        ours.push(images as f64 / e);
        theirs.push(images as f64 / p);
        ratios.push(p / e);
    }
    let (_, e, _) = quartiles(ours);
    let (_, p, _) = quartiles(theirs);
    let (r25, r50, r75) = quartiles(ratios);
    println!("{name:<44} {e:>9.1} {p:>9.1} {r50:>7.2}x  {r25:.2}-{r75:.2}x");
    Ok(())
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken from the command line.
    let threads = rayon::current_num_threads();
    let rounds: usize = std::env::var("EFFRANK_PAIRED_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    // Without PyTorch this bench has nothing to compare against: it says so
    // and steps aside, so that a plain `cargo bench` still runs the others.
    let mut py = match PyTorch::start(threads) {
        Ok(py) => py,
        Err(e) => {
            eprintln!("cpu_vs_pytorch: skipped, no PyTorch to compare with: {e}");
            return;
        }
    };
    println!("engine vs PyTorch + timm, CPU, {threads} threads, {rounds} alternating rounds of {ITERS_PER_ROUND} iterations each");
    println!(
        "{:<44} {:>9} {:>9} {:>8}  quartiles",
        "workload (images/s, medians)", "engine", "PyTorch", "ratio"
    );

    let run = |py: &mut PyTorch| -> Result<(), String> {
        let mut step = TrainStep::vit_cifar(64, true);
        paired(
            py,
            "train step vit-cifar b64 (class-token tail)",
            "train",
            64,
            rounds,
            &mut || step.run(),
        )?;
        drop(step);
        let mut step = TrainStep::vit_cifar(64, false);
        paired(
            py,
            "train step vit-cifar b64 (every token)",
            "train",
            64,
            rounds,
            &mut || step.run(),
        )?;
        drop(step);

        let mut forward = Forward::vit_b32(8);
        paired(
            py,
            "forward vit-b32 b8 (inference path)",
            "forward",
            8,
            rounds,
            &mut || drop(forward.inference()),
        )?;
        paired(
            py,
            "forward vit-b32 b8 (every token)",
            "forward",
            8,
            rounds,
            &mut || drop(forward.every_token()),
        )
    };
    if let Err(e) = run(&mut py) {
        eprintln!("cpu_vs_pytorch: {e}");
        std::process::exit(1);
    }
}
