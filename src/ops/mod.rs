//! One folder per operation (dfdx style): `mod.rs` holds the math, the
//! contract's tests and the CPU-vs-CUDA comparisons; `cpu.rs` the reference
//! implementation; `cuda.rs` the launcher of the kernel in `kernels/`.
//! The contract of each operation is the matching `Backend` method.

pub mod adamw;
pub mod attention;
pub mod embed;
pub mod gelu;
pub mod image;
pub mod layernorm;
pub mod loss;
pub mod lowrank;
pub mod matmul;
pub mod simd;
#[cfg(test)]
pub mod testing;
