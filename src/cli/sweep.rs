//! `effrank-engine sweep` (to be written).

use anyhow::{bail, Result};
use clap::Args;

/// (to be written)
#[derive(Args, Debug)]
pub struct SweepArgs {}

pub fn run(_args: SweepArgs) -> Result<()> {
    bail!("'sweep' is not implemented yet")
}
