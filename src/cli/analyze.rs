//! `effrank-engine analyze` (to be written).

use anyhow::{bail, Result};
use clap::Args;

/// (to be written)
#[derive(Args, Debug)]
pub struct AnalyzeArgs {}

pub fn run(_args: AnalyzeArgs) -> Result<()> {
    bail!("'analyze' is not implemented yet")
}
