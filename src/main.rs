//! The `effrank-engine` command line. Each subcommand lives in `src/cli/`.

mod cli;

fn main() {
    if let Err(e) = cli::main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
