//! `effrank-engine distill` (to be written).

use anyhow::{bail, Result};
use clap::Args;

/// (to be written)
#[derive(Args, Debug)]
pub struct DistillArgs {}

pub fn run(_args: DistillArgs) -> Result<()> {
    bail!("'distill' is not implemented yet")
}
