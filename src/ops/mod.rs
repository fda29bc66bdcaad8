//! Every operation of the model, one folder each (dfdx's layout). A folder
//! owns its op completely:
//!
//! - `mod.rs`: the math (header comment), the op's settings types, the
//!   kernel trait that each device implements (`GeluKernel`, ...), the
//!   public checked entry points (`gelu::forward`, ...), which validate
//!   every shape once for every device before calling the device body, and
//!   the tests: the CPU's own (values, finite differences, wrong shapes) and
//!   the cross-device comparison, one body run on every device present
//!   (`crate::on_every_device!`);
//! - `cpu.rs`: the kernel trait for `device::Cpu` and the reference loops;
//! - `cuda.rs`: the kernel trait for `device::Cuda`: the kernels of
//!   `kernels/<op>.cu` it launches, declared once with `crate::cuda_kernels!`
//!   (its `KERNELS` list, gathered by `cuda_kernels` below and checked
//!   against the compiled PTX), and its launchers, one per kernel, each
//!   taking its launch shape from a `Cuda` family helper
//!   (`elementwise_config`, ...).
//!
//! Device bodies take a `Checked` token that only code in this module tree
//! can make, so the model, the trainer or a test cannot call a body without
//! its checks. `Backend` bundles every kernel trait: it is what the model,
//! the losses and the optimizer are generic over.
//!
//! Adding an op (say `rmsnorm`): `src/ops/rmsnorm/{mod.rs, cpu.rs, cuda.rs}`,
//! `kernels/rmsnorm.cu`, and one line in `Backend` below (plus its `pub mod`)
//! and one in `cuda_kernels`.

pub mod adamw;
pub mod add;
pub mod add_layernorm;
pub mod attention;
pub mod embed;
pub mod gelu;
pub mod image;
pub mod layernorm;
pub mod loss;
pub mod lowrank;
pub mod matmul;
mod rows;
pub mod scale;
pub mod simd;

pub use rows::Rows;

use crate::device::{check_len, Cpu, Device, Work};
use crate::options::ComputePaths;
use anyhow::Result;

/// Fix the CPU kernels' process-wide choices (`--simd`,
/// `--attention-tiles`, `--profile`) before the first op; the command line
/// calls it once. An error when a level is missing on this CPU or a choice
/// was already fixed otherwise.
pub fn configure_cpu(paths: &ComputePaths, profile: bool) -> Result<()> {
    simd::choose(paths.simd)?;
    attention::cpu::choose_tiles(paths.attention_tiles)?;
    crate::device::cpu::set_profiling(profile)
}

/// Proof that an op's checked entry point has validated the call: every
/// device body takes one, and only code under `crate::ops` can make one.
#[derive(Clone, Copy, Debug)]
pub struct Checked(());

impl Checked {
    pub(in crate::ops) fn new() -> Self {
        Checked(())
    }
}

/// A device with a body for every op: what the model, losses and optimizer
/// are generic over.
pub trait Backend:
    Device
    + adamw::AdamWKernel
    + add::AddKernel
    + add_layernorm::AddLayerNormKernel
    + attention::AttentionKernel
    + embed::EmbedKernel
    + gelu::GeluKernel
    + image::ImageKernel
    + layernorm::LayerNormKernel
    + loss::LossKernel
    + lowrank::LowRankKernel
    + matmul::MatmulKernel
    + scale::ScaleKernel
{
}

impl Backend for Cpu {}
#[cfg(feature = "cuda")]
impl Backend for crate::device::Cuda {}

/// Every CUDA kernel the Rust side can launch: each op's `KERNELS` (declared
/// with `cuda_kernels!` in its `cuda.rs`) and the device's own.
#[cfg(feature = "cuda")]
pub fn cuda_kernels() -> Vec<crate::device::cuda::Kernel> {
    [
        adamw::cuda::KERNELS,
        add::cuda::KERNELS,
        add_layernorm::cuda::KERNELS,
        attention::cuda::KERNELS,
        embed::cuda::KERNELS,
        gelu::cuda::KERNELS,
        image::cuda::KERNELS,
        layernorm::cuda::KERNELS,
        loss::cuda::KERNELS,
        lowrank::cuda::KERNELS,
        matmul::cuda::KERNELS,
        scale::cuda::KERNELS,
        crate::device::cuda::KERNELS,
    ]
    .concat()
}

/// The error of an argument buffer shorter than the op needs.
pub(in crate::ops) fn need<D: Device>(dev: &D, what: &str, buf: &D::Buf, len: usize) -> Result<()> {
    check_len(what, dev.len(buf), len)
}

/// Runs an op's device body, inside a profile span of the device when
/// `work` is given (`Some` only while `Device::profiling()`: each entry
/// point writes `dev.profiling().then(|| ...)`, so the work is not even
/// computed otherwise). The span ends also when the body fails.
pub(in crate::ops) fn profiled<D: Device>(
    dev: &D,
    op: &'static str,
    work: Option<Work>,
    body: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let Some(work) = work else { return body() };
    dev.op_begin(op)?;
    let result = body();
    dev.op_end(op, work)?;
    result
}

/// The least work of an op call: `flops`, and the bytes of touching the
/// given number of elements of each buffer once, in the buffer's storage
/// type (a buffer that is read and written is listed twice).
pub(in crate::ops) fn work<D: Device>(dev: &D, touched: &[(&D::Buf, usize)], flops: f64) -> Work {
    Work::new(
        touched
            .iter()
            .map(|(b, n)| (*n * dev.element_bytes(b)) as f64)
            .sum(),
        flops,
    )
}

/// `a · b` for shape arithmetic, an error instead of an overflow.
pub(in crate::ops) fn product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| anyhow::anyhow!("{what}: shape {dims:?} overflows"))
}

#[cfg(test)]
mod profile_tests {
    use super::{profiled, work};
    use crate::device::{BufKind, Device, Precision, Work};
    use anyhow::Result;
    use std::sync::Mutex;

    /// A device that only records its profile spans (2-byte elements, like bf16).
    #[derive(Default)]
    struct Recorder {
        on: bool,
        spans: Mutex<Vec<String>>,
    }

    impl Device for Recorder {
        type Buf = Vec<f32>;
        fn name(&self) -> String {
            "recorder".into()
        }
        fn precision(&self) -> Precision {
            Precision::Bf16
        }
        fn independent_workers(&self) -> usize {
            1
        }
        fn kind(&self) -> crate::device::DeviceKind {
            crate::device::DeviceKind::Cuda
        }
        fn alloc(&self, len: usize, _: BufKind) -> Result<Vec<f32>> {
            Ok(vec![0.0; len])
        }
        fn upload(&self, host: &[f32], _: BufKind) -> Result<Vec<f32>> {
            Ok(host.to_vec())
        }
        fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
            buf[..host.len()].copy_from_slice(host);
            Ok(())
        }
        fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
            Ok(buf.clone())
        }
        fn len(&self, buf: &Vec<f32>) -> usize {
            buf.len()
        }
        fn zero(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
            buf[..len].fill(0.0);
            Ok(())
        }
        fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> Result<()> {
            dst[..len].copy_from_slice(&src[..len]);
            Ok(())
        }
        fn element_bytes(&self, _: &Vec<f32>) -> usize {
            2
        }
        fn profiling(&self) -> bool {
            self.on
        }
        fn op_begin(&self, op: &'static str) -> Result<()> {
            self.spans.lock().unwrap().push(format!("begin {op}"));
            Ok(())
        }
        fn op_end(&self, op: &'static str, w: Work) -> Result<()> {
            self.spans
                .lock()
                .unwrap()
                .push(format!("end {op} {} {}", w.bytes, w.flops));
            Ok(())
        }
    }

    #[test]
    fn a_profiling_device_sees_each_call_with_its_work_and_others_see_nothing() {
        let (x, mut y) = (vec![0f32; 10], vec![0f32; 10]);
        for on in [false, true] {
            let dev = Recorder {
                on,
                ..Default::default()
            };
            let w = dev
                .profiling()
                .then(|| work(&dev, &[(&x, 10), (&y, 6)], 7.0));
            profiled(&dev, "op", w, || {
                y[0] = 1.0;
                Ok(())
            })
            .unwrap();
            // A failing body still closes its span, and its error comes back.
            let failed = profiled(&dev, "bad", dev.profiling().then(Work::default), || {
                anyhow::bail!("no")
            });
            assert!(failed.is_err());
            let spans = dev.spans.lock().unwrap().clone();
            let want: Vec<String> = if on {
                vec![
                    "begin op".into(),
                    "end op 32 7".into(),
                    "begin bad".into(),
                    "end bad 0 0".into(),
                ]
            } else {
                vec![]
            };
            assert_eq!(spans, want);
        }
        assert_eq!(y[0], 1.0);
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::cuda_kernels;
    use crate::device::cuda::embedded_kernels;
    use crate::device::Precision;
    use std::collections::BTreeSet;

    /// `(file, kernel, suffix)` of every `.visible .entry` in the embedded
    /// PTX, the kernel's name without its precision suffix.
    fn compiled() -> BTreeSet<(String, String, &'static str)> {
        let mut compiled = BTreeSet::new();
        for (module, ptx) in embedded_kernels() {
            for suffix in ["_f32", "_bf16"] {
                let Some(file) = module.strip_suffix(suffix) else {
                    continue;
                };
                for line in ptx.lines() {
                    if let Some(name) = line
                        .trim()
                        .strip_prefix(".visible .entry ")
                        .and_then(|r| r.split('(').next())
                    {
                        let name = name.trim();
                        compiled.insert((
                            file.to_string(),
                            name.strip_suffix(suffix).unwrap_or(name).to_string(),
                            suffix,
                        ));
                    }
                }
            }
        }
        compiled
    }

    /// Every kernel in an op's (or the device's) list exists in the PTX of
    /// its kernel file, in both precisions (bf16-only kernels in bf16 only),
    /// and every compiled kernel is in a list: a renamed kernel or a kernel
    /// nothing declares fails here, in CI, instead of on the first GPU run.
    #[test]
    fn every_listed_kernel_is_compiled_and_every_compiled_kernel_is_listed() {
        if embedded_kernels().is_empty() {
            assert!(
                std::env::var("EFFRANK_REQUIRE_KERNELS").is_err(),
                "EFFRANK_REQUIRE_KERNELS=1 but no kernels are embedded"
            );
            eprintln!("no kernels embedded (built without NVRTC): nothing to check");
            return;
        }
        let listed = cuda_kernels();
        let compiled = compiled();
        let mut wanted = BTreeSet::new();
        for k in &listed {
            for (precision, suffix) in [(Precision::F32, "_f32"), (Precision::Bf16, "_bf16")] {
                if k.compiled_for(precision) {
                    wanted.insert((k.file().to_string(), k.name().to_string(), suffix));
                }
            }
        }
        for (file, kernel, suffix) in &wanted {
            assert!(
                compiled.contains(&(file.clone(), kernel.clone(), *suffix)),
                "the Rust side lists {kernel}{suffix} of kernels/{file}.cu, which has no such kernel"
            );
        }
        for (file, kernel, suffix) in &compiled {
            assert!(
                wanted.contains(&(file.clone(), kernel.clone(), *suffix)),
                "kernels/{file}.cu compiles {kernel}{suffix}, which no kernel list holds (or holds as bf16-only)"
            );
        }
        // Every kernel file is both compiled and listed.
        let files: BTreeSet<&str> = listed.iter().map(|k| k.file()).collect();
        for (module, _) in embedded_kernels() {
            let file = module
                .strip_suffix("_f32")
                .or_else(|| module.strip_suffix("_bf16"))
                .unwrap_or(module);
            assert!(
                files.contains(file),
                "kernels/{file}.cu is compiled but no list names it"
            );
        }
    }

    /// The lists themselves, without a GPU or kernels: no kernel twice,
    /// every op's file present, the one bf16-only kernel marked.
    #[test]
    fn the_kernel_lists_hold_each_kernel_once() {
        let listed = cuda_kernels();
        let unique: BTreeSet<_> = listed.iter().map(|k| (k.file(), k.name())).collect();
        assert_eq!(unique.len(), listed.len(), "a kernel is listed twice");
        let files: BTreeSet<&str> = listed.iter().map(|k| k.file()).collect();
        let want: BTreeSet<&str> = [
            "adamw",
            "add",
            "add_layernorm",
            "attention",
            "device",
            "embed",
            "gelu",
            "image",
            "layernorm",
            "loss",
            "lowrank",
            "matmul",
            "scale",
        ]
        .into_iter()
        .collect();
        assert_eq!(files, want);
        let bf16_only: Vec<&str> = listed
            .iter()
            .filter(|k| k.bf16_only())
            .map(|k| k.name())
            .collect();
        assert_eq!(bf16_only, ["lowrank_forward_aligned"]);
    }
}
