//! CPU backend (to be written): fp32, rayon, matrixmultiply.

/// The CPU reference backend.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;
