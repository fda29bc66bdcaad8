//! CPU implementation (to be written).
