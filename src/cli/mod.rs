//! Command-line parsing (clap) and dispatch to one file per subcommand.

mod analyze;
mod common;
mod distill;
mod eval;
mod factorize;
mod memory;
mod recipe;
mod sensitivity;
mod setup;
mod sweep;
mod train;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;

/// Measures how many dimensions a Vision Transformer actually uses: squeeze
/// every linear layer through a rank-r bottleneck, distill the full model
/// (teacher) into the squeezed one (student), and read off the effective rank
/// from accuracy as a function of r.
///
/// Start with the built-in demo, the whole pipeline in a few minutes on a CPU:
///
///     effrank-engine sweep --demo
#[derive(Parser, Debug)]
#[command(
    name = "effrank-engine",
    version,
    about,
    long_about,
    verbatim_doc_comment
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Train(train::TrainArgs),
    Factorize(factorize::FactorizeArgs),
    Distill(distill::DistillArgs),
    Sweep(sweep::SweepArgs),
    Analyze(analyze::AnalyzeArgs),
    Eval(eval::EvalArgs),
    Sensitivity(sensitivity::SensitivityArgs),
}

pub fn main() -> Result<()> {
    let cli = parse_from(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    // The whole command runs on a rayon worker (see `on_worker_thread`).
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(effrank_engine::device::cpu::WORKER_STACK_BYTES)
        .build_global();
    let started = std::time::Instant::now();
    let result = effrank_engine::device::cpu::on_worker_thread(|| run(cli));
    if let Some(table) = effrank_engine::device::cpu::take_profile().filter(|t| !t.is_empty()) {
        let wall = started.elapsed().as_secs_f64();
        eprintln!(
            "--profile: CPU time per op over the whole command (wall {wall:.2} s, of which {:.2} s in op calls; summed over threads):\n{}",
            table.total_seconds(),
            effrank_engine::perf::format_totals(&table)
        );
    }
    result
}

/// Parse a command line; with `--recipe`, parse it again with the
/// recipe's flags the user did not give inserted (`recipe::expand`).
fn parse_from(argv: Vec<OsString>) -> Result<Cli, clap::Error> {
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let (table, given) = match matches.subcommand() {
        Some(("train", m)) if m.contains_id("recipe") => (&recipe::TEACHER, m),
        Some(("sweep", m)) if m.contains_id("recipe") => (&recipe::STUDENTS, m),
        _ => return Cli::from_arg_matches(&matches),
    };
    Cli::from_arg_matches(
        &Cli::command().try_get_matches_from(recipe::expand(&argv, given, table))?,
    )
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Factorize(a) => factorize::run(a),
        Command::Distill(a) => distill::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Sensitivity(a) => sensitivity::run(a),
    }
}
