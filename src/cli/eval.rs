//! `effrank-engine eval` (to be written).

use anyhow::{bail, Result};
use clap::Args;

/// (to be written)
#[derive(Args, Debug)]
pub struct EvalArgs {}

pub fn run(_args: EvalArgs) -> Result<()> {
    bail!("'eval' is not implemented yet")
}
