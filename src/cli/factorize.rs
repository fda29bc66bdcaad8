//! `effrank-engine factorize` (to be written).

use anyhow::{bail, Result};
use clap::Args;

/// (to be written)
#[derive(Args, Debug)]
pub struct FactorizeArgs {}

pub fn run(_args: FactorizeArgs) -> Result<()> {
    bail!("'factorize' is not implemented yet")
}
