//! effrank-engine: measures the effective rank of Vision Transformers.
//!
//! See README.md for the architecture and `../shared/METHOD.md` for the method.

pub mod analysis;
pub mod data;
pub mod device;
pub mod factorize;
pub mod faults;
pub mod io;
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
