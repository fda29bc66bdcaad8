//! effrank-engine: measures the effective rank of Vision Transformers.
//!
//! See README.md for a quick start and a map, `docs/method.md` for the method and
//! `docs/architecture.md` for how the code is laid out.

pub mod analysis;
pub mod data;
pub mod device;
pub mod durable;
pub mod factorize;
pub mod faults;
pub mod formats;
pub mod linalg;
pub mod memory;
pub mod model;
pub mod ops;
pub mod options;
pub mod perf;
pub mod provenance;
pub mod results;
pub mod rng;
pub mod sweep;
#[doc(hidden)]
pub mod testing;
pub mod train;
