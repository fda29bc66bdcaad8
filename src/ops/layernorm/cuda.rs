//! CUDA implementation (to be written).
