//! The Vision Transformer: configuration, parameters, forward and backward,
//! checkpoints and the importers of other libraries' tensor names.

pub mod checkpoint;
pub mod config;
pub mod family;
pub mod hub;
pub mod import;
pub mod init;
pub mod params;
pub mod pth;
pub mod rename;
pub mod resample;

pub use config::VitConfig;
pub use family::{Family, Pool, PosEmbed};
pub use params::{Linear, Ranks, VitParams};
mod block;
pub mod linear;
pub mod pool;
mod tokens;
pub mod vit;

pub use vit::{Grads, OutputGrads, Vit, VitActs, VitBackwardScratch};
