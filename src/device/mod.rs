//! The device layer: where numbers live and how they move. A device owns
//! flat buffers of real numbers (`Device::Buf`), their storage precision,
//! its streams and compiled kernel modules, and the transfers between host
//! and device. It runs no operation of the model: every operation lives in
//! its own folder under `src/ops/`, which implements it for each device, and
//! nothing here imports `crate::ops`.
//!
//! - `Cpu` (`cpu.rs`): `Vec<f32>` buffers; rayon's thread pool.
//! - `Cuda` (`cuda.rs`, feature `cuda`): device memory in fp32 or bf16, one
//!   stream, the cuBLAS handle, the PTX modules of `kernels/*.cu` (loaded
//!   once, looked up by each op's `cuda.rs`), and the bf16 copies of fp32
//!   weights that feed bf16 matrix products.
//!
//! Profiling: every op's checked entry point (`src/ops/<op>/mod.rs`) wraps
//! its device body in `Device::op_begin` / `op_end` when
//! `Device::profiling()` says so; the defaults do nothing, so the CPU pays
//! one `false` per call. The CUDA device records a CUDA event pair per call
//! and sums device time and work per op (`crate::perf::OpTable`).
//!
//! Conventions: tensors are row-major and contiguous; a buffer may be longer
//! than an operation's shape says and only its leading elements are
//! touched. Scalars the host needs (losses, norms) stay in device buffers
//! and are read with `download` only when printed, so a training step needs
//! no host synchronization.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use anyhow::{bail, Result};

pub use crate::perf::Work;

pub use cpu::Cpu;
#[cfg(feature = "cuda")]
pub use cuda::Cuda;

/// The kinds of device, whose defaults differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// Fix a process-wide choice of the CPU's kernels (`ops::configure_cpu`, `cpu::set_profiling`):
/// the first call, or the first use, which fixes the default, wins; a
/// later call that asks for something else is an error naming `what`.
pub fn set_once<T: Copy + PartialEq + std::fmt::Debug>(
    cell: &std::sync::OnceLock<T>,
    value: T,
    what: &str,
) -> Result<()> {
    let fixed = *cell.get_or_init(|| value);
    if fixed != value {
        bail!(
            "{what} is already fixed to {fixed:?} in this process; it cannot change to {value:?}"
        );
    }
    Ok(())
}

/// What a buffer holds, so that a device may store the kinds at different
/// precisions. The CPU stores everything in fp32; CUDA in bf16 mixed
/// precision stores `Activation` in bf16 and the rest in fp32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufKind {
    /// Master weights, their gradients, optimizer moments, loss accumulators.
    Param,
    /// Activations and their gradients.
    Activation,
    /// Per-row statistics kept at full precision (LayerNorm mean and 1/std).
    Statistic,
}

/// Storage precision of activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything fp32, fp32 products: the reference.
    F32,
    /// bf16 activations and weight copies, fp32 master weights and optimizer.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => bail!("unknown precision '{other}': use bf16 or fp32"),
        }
    }
}

/// Buffers and transfers on one device.
pub trait Device: Send + Sync {
    /// A flat buffer of real numbers on this device.
    type Buf: Send + Sync;

    /// A short name for messages: "cpu (2 threads)" or "cuda (NVIDIA H200, bf16 ...)".
    fn name(&self) -> String;
    /// The storage precision of activations.
    fn precision(&self) -> Precision;
    /// How many independent jobs (students) this device can run at once,
    /// each from its own thread: the CPU's threads, one per GPU (one stream).
    fn independent_workers(&self) -> usize;
    /// What kind of device this is: the defaults of the paths the model
    /// takes depend on it (`options::ComputeOptions::resolve`); the device
    /// itself decides none of them.
    fn kind(&self) -> DeviceKind;
    /// Free memory of the device itself, in bytes, for the memory plan
    /// (`memory`): the GPU's, from the driver; `None` for the CPU, whose
    /// buffers are host memory.
    fn free_memory(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, kind: BufKind) -> Result<Self::Buf>;
    /// A buffer holding a copy of `host`.
    fn upload(&self, host: &[f32], kind: BufKind) -> Result<Self::Buf>;
    /// Overwrite the leading `host.len()` elements of `buf` with `host`.
    fn write(&self, buf: &mut Self::Buf, host: &[f32]) -> Result<()>;
    /// All elements of `buf`, as fp32, on the host (synchronizes).
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of elements of `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Set the leading `len` elements of `buf` to zero.
    fn zero(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
    /// Writes `dst[i] = src[i]` for `i < len` (converting to `dst`'s storage type).
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<()>;
    /// Bytes of one stored element of `buf` (4 for fp32, 2 for bf16).
    fn element_bytes(&self, buf: &Self::Buf) -> usize;

    /// Whether op calls are profiled. False unless the device was opened to
    /// profile (`--profile`); the op layer asks
    /// before every call and does nothing more when it is false.
    fn profiling(&self) -> bool {
        false
    }
    /// Start of the profiled op call `op` (called only while `profiling()`).
    fn op_begin(&self, _op: &'static str) -> Result<()> {
        Ok(())
    }
    /// End of the profiled op call `op`, which had to do at least `work`.
    fn op_end(&self, _op: &'static str, _work: Work) -> Result<()> {
        Ok(())
    }
}

/// The error of a buffer too short for an operation: `what` names the
/// operation and the argument.
pub fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        bail!("{what}: buffer of {have} elements, the operation needs {need}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, randn};

    /// zero, copy and write on every device against the CPU, in every kind.
    fn memory_ops_match<D: Device>(dev: &D) {
        let n = 10_007;
        for kind in [BufKind::Activation, BufKind::Param] {
            let inputs = vec![
                (kind, randn(2, n, 1.0)),
                (kind, randn(3, n, 1.0)),
                (kind, randn(4, n, 1.0)),
            ];
            let (c, g) = crate::on_both!(dev, inputs, |be, [b, z, d]| {
                be.zero(z, n / 2).unwrap();
                be.copy(d, b, n - 5).unwrap();
                be.write(b, &[7.0; 100]).unwrap();
            });
            assert_close(
                &format!("memory ops {:?} {kind:?}", dev.precision()),
                &g,
                &c,
                0.0,
            );
            assert_eq!(dev.len(&dev.alloc(123, kind).unwrap()), 123);
            assert!(
                dev.zero(&mut dev.alloc(3, kind).unwrap(), 4).is_err(),
                "zeroing past the end must be an error"
            );
        }
    }

    crate::on_every_device!(memory_ops_match);
}
