//! `effrank-engine train` (to be written).

use anyhow::{bail, Result};
use clap::Args;

/// (to be written)
#[derive(Args, Debug)]
pub struct TrainArgs {}

pub fn run(_args: TrainArgs) -> Result<()> {
    bail!("'train' is not implemented yet")
}
