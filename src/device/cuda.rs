//! The CUDA device: one GPU, its default stream, a cuBLAS handle, the PTX
//! modules that `build.rs` compiled from `kernels/*.cu` with NVRTC and
//! embedded in the binary, and buffers in fp32 or bf16.
//!
//! Precision (`Precision`, chosen when the device is opened):
//! - `Bf16` (the default, mixed precision): activations and their gradients
//!   are stored in bf16 (`BufKind::Activation`); master weights, their
//!   gradients, the optimizer state, LayerNorm statistics and loss
//!   accumulators stay fp32 (`BufKind::Param`, `BufKind::Statistic`). A
//!   weight that feeds a matrix product keeps a bf16 copy beside its fp32
//!   master (`operand`; refreshed by the fused AdamW kernel, or on first use
//!   after any other write). Products take bf16 operands and accumulate in
//!   fp32; every kernel computes in fp32.
//! - `F32`: every buffer fp32 and every product a plain fp32 GEMM (no TF32),
//!   so results match the CPU reference to fp32 rounding.
//!
//! Kernels: every op folder's `cuda.rs` declares the kernels it launches
//! once, with `cuda_kernels!` (a `Kernel` const each, and the module's
//! `KERNELS` list; `ops::cuda_kernels` gathers every list and a test checks
//! it against the compiled PTX), and asks for one with `function(KERNEL,
//! shared_bytes)` (`gelu_forward` is `gelu_forward_bf16` or `_f32` of
//! `kernels/gelu.cu`); this file knows no kernel by name except its own
//! `kernels/device.cu` (the fp32 → bf16 conversion behind weight copies and
//! cross-precision copies). A kernel that asks for more than 48 KiB of
//! dynamic shared memory is opted in here on first use.
//!
//! Launch shapes: each launch takes its grid, block and shared memory from
//! one family helper (`elementwise_config`, `warp_per_row_config`,
//! `block_per_row_config`, `column_sum_config`, `tiled_config`), then
//! pushes the kernel's arguments.
//!
//! Kernels that are off by default (`CudaOptions`), switched on by the
//! options the device is opened with (`--short-attention`): new kernels that
//! run beside the default ones until a GPU run has measured them
//! (docs/gpu.md).
//!
//! Profiling (`--profile`, or `CudaOptions::profile`): every op call
//! (`Device::op_begin` / `op_end`, from the op layer's entry points) and
//! every copy, zeroing and upload outside an op is bracketed by a CUDA event
//! pair; `take_profile` sums device time and work per op name
//! (`crate::perf::OpTable`). Nested calls count in the outermost one. A
//! profiled device that was never asked for its profile prints it to
//! stderr when dropped.
//!
//! Everything runs in order on the default stream; the only host
//! synchronizations are `download` and the host-to-device copies of the
//! per-batch inputs (image bytes, labels), which the caller hands over as
//! host slices anyway.

use super::{check_len, BufKind, Device, DeviceKind, Precision, Work};
use crate::perf::OpTable;
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::cudaDataType;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    DriverError, LaunchConfig, PushKernelArg,
};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

crate::cuda_kernels! {
    "device";
    CONVERT_F32_TO_BF16 = "convert_f32_to_bf16",
}

/// One kernel of `kernels/<file>.cu` as the Rust side launches it: `name`
/// without the precision suffix (`gelu_forward` is `gelu_forward_bf16` or
/// `gelu_forward_f32` in the PTX), and whether it is compiled only for bf16.
/// Made by `cuda_kernels!`, which also lists it in its module's `KERNELS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kernel {
    file: &'static str,
    name: &'static str,
    bf16_only: bool,
}

impl Kernel {
    /// Use `cuda_kernels!`, which puts the kernel in its module's list.
    #[doc(hidden)]
    pub const fn new(file: &'static str, name: &'static str, bf16_only: bool) -> Self {
        Kernel {
            file,
            name,
            bf16_only,
        }
    }
    /// The kernel file's stem: `kernels/<file>.cu`.
    pub fn file(&self) -> &'static str {
        self.file
    }
    /// The kernel's name without the precision suffix.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// Whether the kernel exists only in the bf16 PTX.
    pub fn bf16_only(&self) -> bool {
        self.bf16_only
    }
    /// Whether the kernel is compiled for `precision`.
    pub fn compiled_for(&self, precision: Precision) -> bool {
        !self.bf16_only || precision == Precision::Bf16
    }
}

/// Declares the kernels of one kernel file that a module launches, once:
///
/// ```ignore
/// crate::cuda_kernels! { "gelu"; FORWARD = "gelu_forward", BACKWARD = "gelu_backward" }
/// ```
///
/// makes a private `const FORWARD: Kernel` (and `BACKWARD`) of
/// `kernels/gelu.cu` and `pub const KERNELS: &[Kernel]` listing them all,
/// so that every kernel the module can launch is in its list
/// (`ops::cuda_kernels`, checked against the compiled PTX). A kernel
/// compiled only for bf16 carries the marker `(bf16)`:
/// `ALIGNED = "lowrank_forward_aligned" (bf16)`.
#[macro_export]
macro_rules! cuda_kernels {
    (@bf16_only) => {
        false
    };
    (@bf16_only bf16) => {
        true
    };
    ($file:literal; $($konst:ident = $name:literal $(($only:ident))?),+ $(,)?) => {
        $(
            const $konst: $crate::device::cuda::Kernel = $crate::device::cuda::Kernel::new(
                $file,
                $name,
                $crate::cuda_kernels!(@bf16_only $($only)?),
            );
        )+
        /// Every kernel this module launches.
        pub const KERNELS: &[$crate::device::cuda::Kernel] = &[$($konst),+];
    };
}

/// `context` for cudarc's `DriverError`, which (without cudarc's `std`
/// feature) implements neither `Display` nor `Error`.
pub trait DriverResultExt<T> {
    fn cu_context(self, what: &str) -> Result<T>;
    fn cu_with_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DriverResultExt<T> for std::result::Result<T, DriverError> {
    fn cu_context(self, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what}: {e:?}"))
    }
    fn cu_with_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| anyhow!("{}: {e:?}", what()))
    }
}

mod table {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The kernel files embedded at build time: `(file stem + precision suffix, PTX)`,
/// e.g. `("gelu_bf16", ...)`.
pub fn embedded_kernels() -> &'static [(&'static str, &'static str)] {
    table::KERNELS
}

/// Rows summed by one block of the column-sum kernels (`column_sum_config`;
/// the kernels take it as their `rows_per_block` argument).
pub const COLUMN_SUM_ROWS_PER_BLOCK: usize = 256;

/// Dynamic shared memory a block may use without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// A cheap probe for `--device auto`: the driver library loads and reports
/// at least one device, and the kernels are embedded. Never panics.
pub fn cuda_available() -> bool {
    if embedded_kernels().is_empty() || !driver_present() {
        return false;
    }
    CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

fn driver_present() -> bool {
    // SAFETY: only probes whether libcuda.so can be opened.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

fn cublas_present() -> bool {
    // SAFETY: only probes whether libcublas.so can be opened.
    std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false)
}

/// Suffix of the kernel names (and module names) compiled for a precision
/// (build.rs, kernels/common.cuh).
fn kernel_suffix(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "_f32",
        Precision::Bf16 => "_bf16",
    }
}

/// Device storage of one buffer.
enum Store {
    F32(CudaSlice<f32>),
    /// bf16 values as raw bits.
    Bf16(CudaSlice<u16>),
}

/// A device buffer: fp32 or bf16 storage, and for fp32 buffers that feed
/// matrix products in bf16 mode (weights), a bf16 copy made on first use and
/// kept until the buffer is written again.
pub struct CudaBuf {
    store: Store,
    shadow: Mutex<Shadow>,
}

#[derive(Default)]
struct Shadow {
    copy: Option<CudaSlice<u16>>,
    fresh: bool,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match &self.store {
            Store::F32(s) => s.len(),
            Store::Bf16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_bf16(&self) -> bool {
        matches!(self.store, Store::Bf16(_))
    }
    fn dtype_name(&self) -> &'static str {
        if self.is_bf16() {
            "bf16"
        } else {
            "fp32"
        }
    }
    /// Marks the bf16 copy stale (the fp32 values are about to change).
    fn touch(&mut self) {
        if let Ok(s) = self.shadow.get_mut() {
            s.fresh = false;
        }
    }
}

fn raw<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// A loaded kernel and the dynamic shared memory it has been allowed.
#[derive(Clone)]
struct Loaded {
    function: CudaFunction,
    shared_allowed: usize,
}

/// How a `Cuda` device is opened beyond its precision: the device's own
/// kernel choices, fixed for its life (`options::ComputePaths`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Attention for sequences of at most 64 tokens on tensor cores, Q, K,
    /// V and the scores of one (image, head) in shared memory
    /// (`kernels/attention.cu`, `attention_short_*`); off by default.
    pub short_attention: bool,
    /// Record device time per op call (`take_profile`).
    pub profile: bool,
}

/// One call whose events are recorded and not read yet.
struct Pending {
    op: &'static str,
    work: Work,
    start: CudaEvent,
    end: CudaEvent,
}

/// The state of a profiled device: the open outermost call, the calls
/// waiting to be read, spare events, and the totals read so far.
#[derive(Default)]
struct Profile {
    depth: usize,
    open: Option<CudaEvent>,
    pending: Vec<Pending>,
    spare: Vec<CudaEvent>,
    totals: OpTable,
    taken: bool,
}

/// Calls whose events are read (one synchronization) once this many wait.
const PROFILE_FLUSH: usize = 1024;

/// One CUDA GPU (see the module doc for precision).
pub struct Cuda {
    precision: Precision,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// PTX modules by table name (`gelu_bf16`), loaded when the device opens.
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, Loaded>>,
    device_name: String,
    sm_count: u32,
    max_smem: usize,
    bytes_scratch: Mutex<Option<CudaSlice<u8>>>,
    labels_scratch: Mutex<Option<CudaSlice<u32>>>,
    options: CudaOptions,
    profile: Option<Mutex<Profile>>,
}

impl Cuda {
    /// Opens device `device` in the default precision (bf16 mixed precision).
    pub fn new(device: usize) -> Result<Self> {
        Self::with_precision(device, Precision::Bf16)
    }

    /// Opens device `device` in `precision` on the default kernels.
    pub fn with_precision(device: usize, precision: Precision) -> Result<Self> {
        Self::with_options(device, precision, CudaOptions::default())
    }

    /// Opens device `device`, loads every embedded kernel module and a cuBLAS handle.
    pub fn with_options(device: usize, precision: Precision, options: CudaOptions) -> Result<Self> {
        if !driver_present() {
            bail!("no CUDA driver found (libcuda.so); use --device cpu");
        }
        let count = CudaContext::device_count()
            .map_err(|e| anyhow!("CUDA driver present but not usable ({e:?}); use --device cpu"))?;
        if device >= count.max(0) as usize {
            bail!("CUDA device {device} requested but {count} device(s) found; use --device cpu");
        }
        if embedded_kernels().is_empty() {
            bail!("this binary was built without NVRTC, so it holds no CUDA kernels: run `source scripts/ci_kernels.sh` and rebuild, or use --device cpu");
        }
        if !cublas_present() {
            bail!("cuBLAS (libcublas.so.13) not found: install the CUDA 13 toolkit or `pip install nvidia-cublas` and add its lib folder to LD_LIBRARY_PATH; or use --device cpu");
        }
        let ctx =
            CudaContext::new(device).cu_with_context(|| format!("opening CUDA device {device}"))?;
        // SAFETY: all work runs in order on one stream, so cudarc's per-buffer
        // events (for ordering across streams) are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| anyhow!("reading device attribute {a:?}: {e:?}"))
        };
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem =
            attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as usize;
        let modules = load_modules(&ctx)?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let profile = options.profile.then(|| Mutex::new(Profile::default()));
        Ok(Cuda {
            precision,
            ctx,
            stream,
            blas,
            modules,
            functions: Mutex::new(HashMap::new()),
            device_name,
            sm_count,
            max_smem,
            bytes_scratch: Mutex::new(None),
            labels_scratch: Mutex::new(None),
            options,
            profile,
        })
    }

    /// The kernel choices this device was opened with.
    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// Device time and work per op since the last call (synchronizes);
    /// an error if the device was not opened to profile.
    pub fn take_profile(&self) -> Result<OpTable> {
        let mut p = self.profile_state()?.ok_or_else(|| anyhow!("this CUDA device was opened without profiling (--profile, or CudaOptions::profile)"))?;
        self.read_pending(&mut p)?;
        p.taken = true;
        Ok(std::mem::take(&mut p.totals))
    }

    fn profile_state(&self) -> Result<Option<std::sync::MutexGuard<'_, Profile>>> {
        self.profile
            .as_ref()
            .map(|m| m.lock().map_err(|_| anyhow!("profile lock poisoned")))
            .transpose()
    }

    /// Median device seconds per call of `f` over `iters` calls after 3
    /// warm-up calls, each call bracketed by a CUDA event pair (device time:
    /// gaps inside a call count, host time between calls does not).
    pub fn median_device_seconds(
        &self,
        iters: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        let event = || {
            self.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .cu_context("creating a CUDA event")
        };
        let mut pairs = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            let (start, end) = (event()?, event()?);
            start
                .record(&self.stream)
                .cu_context("recording an event")?;
            f()?;
            end.record(&self.stream).cu_context("recording an event")?;
            pairs.push((start, end));
        }
        let mut ms = pairs
            .iter()
            .map(|(s, e)| s.elapsed_ms(e).map(f64::from))
            .collect::<std::result::Result<Vec<_>, _>>()
            .cu_context("reading event times")?;
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2] / 1e3)
    }

    /// A spare event, or a new one that records time.
    fn event(&self, p: &mut Profile) -> Result<CudaEvent> {
        match p.spare.pop() {
            Some(e) => Ok(e),
            None => self
                .ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .cu_context("creating a CUDA event"),
        }
    }

    /// Reads the time of every pending call into the totals.
    fn read_pending(&self, p: &mut Profile) -> Result<()> {
        for c in std::mem::take(&mut p.pending) {
            let ms = c
                .start
                .elapsed_ms(&c.end)
                .cu_with_context(|| format!("reading the events of {}", c.op))?;
            p.totals.record(c.op, ms as f64 / 1e3, c.work);
            p.spare.extend([c.start, c.end]);
        }
        Ok(())
    }

    /// `op_begin` / `op_end` around `body` for the device's own transfers
    /// (they count in an op when called inside one).
    fn span<R>(
        &self,
        op: &'static str,
        work: impl FnOnce() -> Work,
        body: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if self.profile.is_none() {
            return body();
        }
        let w = work();
        Device::op_begin(self, op)?;
        let r = body();
        Device::op_end(self, op, w)?;
        r
    }

    /// `kernel`, compiled for this device's precision, allowed
    /// `shared_bytes` of dynamic shared memory (opting in past 48 KiB; an
    /// error past the device's limit, or for a bf16-only kernel on an fp32
    /// device).
    pub fn function(&self, kernel: Kernel, shared_bytes: usize) -> Result<CudaFunction> {
        let (file, name) = (kernel.file(), kernel.name());
        if !kernel.compiled_for(self.precision) {
            bail!("kernel {name} of kernels/{file}.cu is compiled only for bf16; this device runs {:?}", self.precision);
        }
        let suffix = kernel_suffix(self.precision);
        let full = format!("{name}{suffix}");
        let mut functions = self
            .functions
            .lock()
            .map_err(|_| anyhow!("kernel table lock poisoned"))?;
        let loaded = match functions.get(&full) {
            Some(l) => l.clone(),
            None => {
                let module_name = format!("{file}{suffix}");
                let module = self.modules.get(module_name.as_str()).ok_or_else(|| {
                    anyhow!(
                        "kernels/{file}.cu is not among the embedded kernel files ({module_name})"
                    )
                })?;
                let function = module
                    .load_function(&full)
                    .cu_with_context(|| format!("loading kernel {full} from kernels/{file}.cu"))?;
                Loaded {
                    function,
                    shared_allowed: DEFAULT_SHARED_BYTES,
                }
            }
        };
        let loaded = if shared_bytes > loaded.shared_allowed {
            if shared_bytes > self.max_smem {
                bail!(
                    "kernel {full} needs {shared_bytes} bytes of shared memory; this GPU allows {}",
                    self.max_smem
                );
            }
            loaded
                .function
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    self.max_smem as i32,
                )
                .cu_with_context(|| {
                    format!(
                        "allowing kernel {full} {} bytes of shared memory",
                        self.max_smem
                    )
                })?;
            Loaded {
                shared_allowed: self.max_smem,
                ..loaded
            }
        } else {
            loaded
        };
        let function = loaded.function.clone();
        functions.insert(full, loaded);
        Ok(function)
    }

    /// The storage precision of activations.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    // ---- raw pointers for kernel arguments, with the dtype each role needs

    /// An activation (act_t in the kernels): bf16 in bf16 mode, else fp32.
    pub fn act(&self, b: &CudaBuf, what: &str) -> Result<u64> {
        self.expect_act(b, what)?;
        Ok(self.ptr(b))
    }
    pub fn act_mut(&self, b: &mut CudaBuf, what: &str) -> Result<u64> {
        self.expect_act(b, what)?;
        b.touch();
        Ok(self.ptr(b))
    }
    /// An fp32 buffer (parameters, gradients, statistics, accumulators).
    pub fn f32(&self, b: &CudaBuf, what: &str) -> Result<u64> {
        if b.is_bf16() {
            bail!("{what}: a bf16 buffer where the kernel needs fp32 (allocate it as BufKind::Param or Statistic)");
        }
        Ok(self.ptr(b))
    }
    pub fn f32_mut(&self, b: &mut CudaBuf, what: &str) -> Result<u64> {
        let p = self.f32(b, what)?;
        b.touch();
        Ok(p)
    }
    /// A matrix-product operand in act_t: activations as they are; an fp32
    /// weight in bf16 mode through its bf16 copy (made or refreshed here).
    pub fn operand(&self, b: &CudaBuf, what: &str) -> Result<u64> {
        match (&b.store, self.precision) {
            (Store::Bf16(_), Precision::Bf16) | (Store::F32(_), Precision::F32) => Ok(self.ptr(b)),
            (Store::F32(master), Precision::Bf16) => self.bf16_copy(b, master, what),
            (Store::Bf16(_), Precision::F32) => bail!("{what}: a bf16 buffer on an fp32 device"),
        }
    }
    fn bf16_copy(&self, b: &CudaBuf, master: &CudaSlice<f32>, what: &str) -> Result<u64> {
        let mut sh = b
            .shadow
            .lock()
            .map_err(|_| anyhow!("{what}: bf16 copy lock poisoned"))?;
        if sh.copy.is_none() {
            sh.copy = Some(
                self.stream
                    .alloc_zeros::<u16>(master.len().max(1))
                    .map_err(|e| alloc_error(e, master.len(), "a bf16 weight copy"))?,
            );
            sh.fresh = false;
        }
        let copy = raw(sh.copy.as_ref().expect("just made"), &self.stream);
        if !sh.fresh && !master.is_empty() {
            self.convert_f32_to_bf16(copy, raw(master, &self.stream), master.len())?;
        }
        sh.fresh = true;
        Ok(copy)
    }
    /// The bf16 copy of an fp32 weight for a kernel that writes it (AdamW),
    /// or 0 when there is none yet; marks it fresh.
    pub fn bf16_copy_for_update(&self, b: &mut CudaBuf) -> u64 {
        match b.shadow.get_mut() {
            Ok(sh) => match &sh.copy {
                Some(c) => {
                    sh.fresh = true;
                    raw(c, &self.stream)
                }
                None => 0,
            },
            Err(_) => 0,
        }
    }
    /// cuBLAS data type of what `operand` returns.
    pub fn operand_type(&self) -> cudaDataType {
        match self.precision {
            Precision::F32 => cudaDataType::CUDA_R_32F,
            Precision::Bf16 => cudaDataType::CUDA_R_16BF,
        }
    }
    /// A matrix-product output: its pointer and cuBLAS data type.
    pub fn output(&self, b: &mut CudaBuf) -> (u64, cudaDataType) {
        b.touch();
        let t = if b.is_bf16() {
            cudaDataType::CUDA_R_16BF
        } else {
            cudaDataType::CUDA_R_32F
        };
        (self.ptr(b), t)
    }
    fn expect_act(&self, b: &CudaBuf, what: &str) -> Result<()> {
        if b.is_bf16() != (self.precision == Precision::Bf16) {
            bail!("{what}: a {} buffer where the {:?} device's kernels take activations (allocate it as BufKind::Activation)", b.dtype_name(), self.precision);
        }
        Ok(())
    }
    fn ptr(&self, b: &CudaBuf) -> u64 {
        match &b.store {
            Store::F32(s) => raw(s, &self.stream),
            Store::Bf16(s) => raw(s, &self.stream),
        }
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// Largest dynamic shared memory one block may use (bytes, opt-in).
    pub fn max_shared_bytes(&self) -> usize {
        self.max_smem
    }

    // ---- launch shapes: every launch takes its grid, block and dynamic
    // shared memory from one of these families.

    /// Grid-stride over `n` elements (elementwise kernels): 256 threads per
    /// block, at most 32 blocks per SM.
    pub fn elementwise_config(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count as usize * 32);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One warp per row (LayerNorm, row softmax): 8 warps (256 threads) per
    /// block, so `rows / 8` blocks rounded up.
    pub fn warp_per_row_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block of 256 threads per row (the losses).
    pub fn block_per_row_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Column sums of `[rows, cols]` (bias and LayerNorm parameter
    /// gradients): 32 columns × 8 row lanes per block,
    /// `COLUMN_SUM_ROWS_PER_BLOCK` rows per block.
    pub fn column_sum_config(rows: usize, cols: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                cols.div_ceil(32) as u32,
                rows.div_ceil(COLUMN_SUM_ROWS_PER_BLOCK).max(1) as u32,
                1,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `blocks` blocks of `threads` threads, each with `shared_bytes` of
    /// dynamic shared memory (one block per work item: attention's
    /// (image, head) pairs, the low-rank kernel's row tiles). Ask for the
    /// kernel with the same `shared_bytes` (`function`).
    pub fn tiled_config(blocks: usize, threads: usize, shared_bytes: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared_bytes as u32,
        }
    }

    /// Copies `host` bytes into a reusable device buffer and runs `f` on it.
    pub fn with_device_bytes<R>(
        &self,
        host: &[u8],
        f: impl FnOnce(&CudaSlice<u8>) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self
            .bytes_scratch
            .lock()
            .map_err(|_| anyhow!("image byte buffer lock poisoned"))?;
        let buf = scratch(&self.stream, &mut guard, host.len().max(1), "image bytes")?;
        self.stream
            .memcpy_htod(host, &mut buf.slice_mut(..host.len()))
            .map_err(|e| alloc_error(e, host.len(), "image bytes"))?;
        f(buf)
    }

    /// Copies `labels` into a reusable device buffer and runs `f` on it.
    pub fn with_device_labels<R>(
        &self,
        labels: &[u32],
        f: impl FnOnce(&CudaSlice<u32>) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self
            .labels_scratch
            .lock()
            .map_err(|_| anyhow!("label buffer lock poisoned"))?;
        let buf = scratch(&self.stream, &mut guard, labels.len().max(1), "labels")?;
        if !labels.is_empty() {
            self.stream
                .memcpy_htod(labels, &mut buf.slice_mut(..labels.len()))
                .map_err(|e| alloc_error(e, labels.len(), "labels"))?;
        }
        f(buf)
    }

    /// `kernels/device.cu`: `convert_f32_to_bf16(bf16* dst, const float* src, u64 n)`,
    /// on raw device addresses.
    fn convert_f32_to_bf16(&self, dst: u64, src: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let n = len as u64;
        let f = self.function(CONVERT_F32_TO_BF16, 0)?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&dst).arg(&src).arg(&n);
        unsafe { l.launch(self.elementwise_config(len)) }
            .cu_with_context(|| format!("convert_f32_to_bf16 launch ({len} elements)"))?;
        Ok(())
    }
}

/// The buffer in `slot`, grown to at least `len` elements.
fn scratch<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
    what: &str,
) -> Result<&'a mut CudaSlice<T>> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = Some(
            stream
                .alloc_zeros::<T>(len)
                .map_err(|e| alloc_error(e, len, what))?,
        );
    }
    slot.as_mut()
        .ok_or_else(|| anyhow!("{what}: scratch buffer missing"))
}

/// Loads every embedded PTX module (so that a driver too old for the PTX
/// fails when the device opens, not at the first kernel).
fn load_modules(ctx: &Arc<CudaContext>) -> Result<HashMap<&'static str, Arc<CudaModule>>> {
    let mut modules = HashMap::new();
    for (file, ptx) in embedded_kernels() {
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
            .map_err(|e| module_error(e, file))?;
        modules.insert(*file, module);
    }
    Ok(modules)
}

fn module_error(e: DriverError, file: &str) -> anyhow::Error {
    if e.0 == CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
        anyhow!("the CUDA driver is too old for the embedded kernels ({file}, PTX ISA 9.0 from NVRTC 13.0): update the NVIDIA driver to 580 or newer, or use --device cpu")
    } else {
        anyhow!("loading the PTX {file}: {e:?}")
    }
}

/// Turns an allocation failure into a message; out of memory suggests a smaller batch.
pub fn alloc_error(e: DriverError, len: usize, what: &str) -> anyhow::Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        anyhow!(
            "GPU out of memory allocating {what} ({:.2} GiB); try a smaller --batch",
            len as f64 * 4.0 / (1u64 << 30) as f64
        )
    } else {
        anyhow!("CUDA error allocating {what} ({len} elements): {e:?}")
    }
}

impl Device for Cuda {
    type Buf = CudaBuf;

    fn name(&self) -> String {
        let p = match self.precision {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16 mixed precision",
        };
        format!("cuda ({}, {p})", self.device_name)
    }
    fn precision(&self) -> Precision {
        self.precision
    }
    fn independent_workers(&self) -> usize {
        1
    }
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }
    fn free_memory(&self) -> Result<Option<u64>> {
        let (free, _total) = self
            .ctx
            .mem_get_info()
            .cu_context("reading the GPU's free memory")?;
        Ok(Some(free as u64))
    }

    fn alloc(&self, len: usize, kind: BufKind) -> Result<CudaBuf> {
        let bf16 = kind == BufKind::Activation && self.precision == Precision::Bf16;
        let store = if bf16 {
            Store::Bf16(if len == 0 {
                self.stream
                    .null::<u16>()
                    .cu_context("creating an empty GPU buffer")?
            } else {
                self.stream
                    .alloc_zeros::<u16>(len)
                    .map_err(|e| alloc_error(e, len, "a buffer"))?
            })
        } else {
            Store::F32(if len == 0 {
                self.stream
                    .null::<f32>()
                    .cu_context("creating an empty GPU buffer")?
            } else {
                self.stream
                    .alloc_zeros::<f32>(len)
                    .map_err(|e| alloc_error(e, len, "a buffer"))?
            })
        };
        Ok(CudaBuf {
            store,
            shadow: Mutex::new(Shadow::default()),
        })
    }
    fn upload(&self, host: &[f32], kind: BufKind) -> Result<CudaBuf> {
        let mut buf = self.alloc(host.len(), kind)?;
        self.write(&mut buf, host)?;
        Ok(buf)
    }
    fn write(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
        check_len("write", buf.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let bytes = (host.len() * self.element_bytes(buf)) as f64;
        self.span(
            "upload (host to device)",
            || Work::new(bytes, 0.0),
            || self.write_now(buf, host),
        )
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        match &buf.store {
            Store::F32(s) => self.stream.clone_dtoh(s).cu_context("copying from the GPU"),
            Store::Bf16(s) => Ok(self
                .stream
                .clone_dtoh(s)
                .cu_context("copying from the GPU")?
                .into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect()),
        }
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn zero(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        check_len("zero", buf.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let bytes = (len * self.element_bytes(buf)) as f64;
        self.span("zero", || Work::new(bytes, 0.0), || self.zero_now(buf, len))
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        check_len("copy dst", dst.len(), len)?;
        check_len("copy src", src.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let bytes = (len * (self.element_bytes(dst) + self.element_bytes(src))) as f64;
        self.span(
            "copy",
            || Work::new(bytes, 0.0),
            || self.copy_now(dst, src, len),
        )
    }
    fn element_bytes(&self, buf: &CudaBuf) -> usize {
        if buf.is_bf16() {
            2
        } else {
            4
        }
    }
    fn profiling(&self) -> bool {
        self.profile.is_some()
    }
    fn op_begin(&self, _op: &'static str) -> Result<()> {
        let Some(mut p) = self.profile_state()? else {
            return Ok(());
        };
        if p.depth == 0 {
            let start = self.event(&mut p)?;
            start
                .record(&self.stream)
                .cu_context("recording a profile event")?;
            p.open = Some(start);
        }
        p.depth += 1;
        Ok(())
    }
    fn op_end(&self, op: &'static str, work: Work) -> Result<()> {
        let Some(mut p) = self.profile_state()? else {
            return Ok(());
        };
        p.depth = p
            .depth
            .checked_sub(1)
            .ok_or_else(|| anyhow!("profile: {op} ended without a start"))?;
        if p.depth > 0 {
            return Ok(());
        }
        let start = p
            .open
            .take()
            .ok_or_else(|| anyhow!("profile: {op} ended without a start"))?;
        let end = self.event(&mut p)?;
        end.record(&self.stream)
            .cu_context("recording a profile event")?;
        p.pending.push(Pending {
            op,
            work,
            start,
            end,
        });
        if p.pending.len() >= PROFILE_FLUSH {
            self.read_pending(&mut p)?;
        }
        Ok(())
    }
}

impl Cuda {
    fn write_now(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
        buf.touch();
        match &mut buf.store {
            Store::F32(s) => self
                .stream
                .memcpy_htod(host, &mut s.slice_mut(..host.len()))
                .cu_context("copying to the GPU"),
            Store::Bf16(s) => {
                let bits: Vec<u16> = host.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
                self.stream
                    .memcpy_htod(&bits, &mut s.slice_mut(..host.len()))
                    .cu_context("copying to the GPU")
            }
        }
    }
    fn zero_now(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        buf.touch();
        match &mut buf.store {
            Store::F32(s) => self.stream.memset_zeros(&mut s.slice_mut(..len)),
            Store::Bf16(s) => self.stream.memset_zeros(&mut s.slice_mut(..len)),
        }
        .cu_context("zeroing a GPU buffer")
    }
    fn copy_now(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        dst.touch();
        match (&mut dst.store, &src.store) {
            (Store::F32(d), Store::F32(s)) => self
                .stream
                .memcpy_dtod(&s.slice(..len), &mut d.slice_mut(..len))
                .cu_context("copying between GPU buffers"),
            (Store::Bf16(d), Store::Bf16(s)) => self
                .stream
                .memcpy_dtod(&s.slice(..len), &mut d.slice_mut(..len))
                .cu_context("copying between GPU buffers"),
            (Store::Bf16(d), Store::F32(s)) => {
                self.convert_f32_to_bf16(raw(d, &self.stream), raw(s, &self.stream), len)
            }
            (Store::F32(_), Store::Bf16(_)) => {
                bail!("copy: from a bf16 buffer into an fp32 one is not supported")
            }
        }
    }
}

impl Drop for Cuda {
    /// A profiled device nobody asked for its profile (a command run with
    /// `--profile`) prints it.
    fn drop(&mut self) {
        let untaken = self
            .profile_state()
            .ok()
            .flatten()
            .is_some_and(|p| !p.taken);
        if !untaken {
            return;
        }
        match self.take_profile() {
            Ok(t) => eprintln!(
                "--profile: device time per op over the whole run ({}):\n{}",
                self.name(),
                crate::perf::format_totals(&t)
            ),
            Err(e) => eprintln!("--profile: could not read the profile: {e:#}"),
        }
    }
}

#[cfg(test)]
mod kernel_list_tests {
    use super::Kernel;
    use crate::device::Precision;

    crate::cuda_kernels! {
        "sample";
        PLAIN = "sample_plain",
        ONLY_BF16 = "sample_aligned" (bf16),
    }

    #[test]
    fn the_macro_declares_each_kernel_once_in_its_list() {
        assert_eq!(
            (PLAIN.file(), PLAIN.name(), PLAIN.bf16_only()),
            ("sample", "sample_plain", false)
        );
        assert_eq!(
            (ONLY_BF16.file(), ONLY_BF16.name(), ONLY_BF16.bf16_only()),
            ("sample", "sample_aligned", true)
        );
        assert_eq!(KERNELS, &[PLAIN, ONLY_BF16][..]);
        assert!(PLAIN.compiled_for(Precision::F32) && PLAIN.compiled_for(Precision::Bf16));
        assert!(!ONLY_BF16.compiled_for(Precision::F32) && ONLY_BF16.compiled_for(Precision::Bf16));
        assert_eq!(Kernel::new("sample", "sample_plain", false), PLAIN);
    }

    #[test]
    fn the_device_lists_its_own_conversion_kernel() {
        assert_eq!(super::KERNELS, &[super::CONVERT_F32_TO_BF16][..]);
        assert_eq!(super::CONVERT_F32_TO_BF16.name(), "convert_f32_to_bf16");
        assert_eq!(super::CONVERT_F32_TO_BF16.file(), "device");
    }
}
