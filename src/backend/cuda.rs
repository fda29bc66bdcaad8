//! The CUDA backend: `CudaBackend` implements `Backend` with the kernels of
//! `kernels/*.cu` (compiled to PTX by `build.rs` with NVRTC and embedded in
//! the binary) and cuBLAS for the matrix products.
//!
//! Precision (`Precision`, chosen when the backend is created):
//! - `Bf16` (the default, mixed precision): activations and their gradients
//!   are stored in bf16 (`BufKind::Activation`); master weights, their
//!   gradients, the optimizer state, LayerNorm statistics and loss
//!   accumulators stay fp32 (`BufKind::Param`, `BufKind::Statistic`). A
//!   weight that feeds a matrix product keeps a bf16 copy beside its fp32
//!   master (refreshed by the fused AdamW kernel, or on first use after any
//!   other write). Matrix products take bf16 operands and accumulate in fp32
//!   (cuBLAS `GemmEx`, compute type 32F); every kernel computes in fp32.
//! - `F32`: every buffer fp32 and every product a plain fp32 GEMM (no TF32),
//!   so results match the CPU reference to fp32 rounding; the reference the
//!   bf16 path and the tests are checked against.
//!
//! Reductions that the CPU sums in f64 (losses, the gradient norm) are
//! summed in fp64 on the device too.
//!
//! Everything runs in order on the context's default stream; the only host
//! synchronizations are `download` and the host-to-device copies of the
//! per-batch inputs (image bytes, labels), which the caller hands over as
//! host slices anyway. Each operation's launcher lives in
//! `src/ops/<op>/cuda.rs`; this file holds device setup, buffers, and the
//! `Backend` glue with its shape checks.

use super::{AdamWStep, Backend, BufKind, ImageTransform, LogitLossConfig};
use crate::ops;
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};
use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// The kernel files embedded at build time: `(file name, PTX)`.
pub fn embedded_kernels() -> &'static [(&'static str, &'static str)] {
    table::KERNELS
}

/// Kernels that take more than 48 KiB of dynamic shared memory.
const LARGE_SMEM_KERNELS: [&str; 4] = ["attention_forward", "attention_backward", "lowrank_forward", "lowrank_forward_aligned"];

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

/// Storage precision of activations (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything fp32, fp32 GEMMs: the reference.
    F32,
    /// bf16 activations and weight copies, fp32 master weights and optimizer.
    Bf16,
}

impl Precision {
    /// Suffix of the kernel names compiled for this precision (build.rs).
    fn kernel_suffix(self) -> &'static str {
        match self {
            Precision::F32 => "_f32",
            Precision::Bf16 => "_bf16",
        }
    }
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

/// The CUDA backend on one device (see the module doc for precision).
pub struct CudaBackend {
    precision: Precision,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<String, CudaFunction>,
    device_name: String,
    sm_count: u32,
    max_smem: usize,
    bytes_scratch: Mutex<Option<CudaSlice<u8>>>,
    labels_scratch: Mutex<Option<CudaSlice<u32>>>,
}

impl CudaBackend {
    /// Opens device `device` in the default precision (bf16 mixed precision).
    pub fn new(device: usize) -> Result<Self> {
        Self::with_precision(device, Precision::Bf16)
    }

    /// Opens device `device`, loads every embedded kernel and a cuBLAS handle.
    pub fn with_precision(device: usize, precision: Precision) -> Result<Self> {
        if !driver_present() {
            bail!("no CUDA driver found (libcuda.so); use --device cpu");
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA driver present but not usable ({e:?}); use --device cpu"))?;
        if device >= count.max(0) as usize {
            bail!("CUDA device {device} requested but {count} device(s) found; use --device cpu");
        }
        if embedded_kernels().is_empty() {
            bail!("this binary was built without NVRTC, so it holds no CUDA kernels: run `source scripts/ci_kernels.sh` and rebuild, or use --device cpu");
        }
        if !cublas_present() {
            bail!("cuBLAS (libcublas.so.13) not found: install the CUDA 13 toolkit or `pip install nvidia-cublas` and add its lib folder to LD_LIBRARY_PATH; or use --device cpu");
        }
        let ctx = CudaContext::new(device).cu_with_context(|| format!("opening CUDA device {device}"))?;
        // SAFETY: all work runs in order on one stream, so cudarc's per-buffer
        // events (for ordering across streams) are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        let attr = |a| ctx.attribute(a).map_err(|e| anyhow!("reading device attribute {a:?}: {e:?}"));
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let functions = load_kernels(&ctx, max_smem)?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(CudaBackend { precision, ctx, stream, blas, functions, device_name, sm_count, max_smem, bytes_scratch: Mutex::new(None), labels_scratch: Mutex::new(None) })
    }

    /// The kernel `name` compiled for this backend's precision (`name_f32`
    /// or `name_bf16`, see kernels/common.cuh).
    pub fn func(&self, name: &str) -> Result<&CudaFunction> {
        let full = format!("{name}{}", self.precision.kernel_suffix());
        self.functions.get(&full).ok_or_else(|| anyhow!("CUDA kernel {full} is not among the embedded kernels"))
    }
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
            (Store::Bf16(_), Precision::F32) => bail!("{what}: a bf16 buffer on an fp32 backend"),
        }
    }
    fn bf16_copy(&self, b: &CudaBuf, master: &CudaSlice<f32>, what: &str) -> Result<u64> {
        let mut sh = b.shadow.lock().map_err(|_| anyhow!("{what}: bf16 copy lock poisoned"))?;
        if sh.copy.is_none() {
            sh.copy = Some(self.stream.alloc_zeros::<u16>(master.len().max(1)).map_err(|e| alloc_error(e, master.len(), "a bf16 weight copy"))?);
            sh.fresh = false;
        }
        let copy = raw(sh.copy.as_ref().expect("just made"), &self.stream);
        if !sh.fresh && !master.is_empty() {
            ops::gelu::cuda::convert_f32_to_bf16(self, copy, raw(master, &self.stream), master.len())?;
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
    pub fn operand_type(&self) -> cudarc::cublas::sys::cudaDataType {
        match self.precision {
            Precision::F32 => cudarc::cublas::sys::cudaDataType::CUDA_R_32F,
            Precision::Bf16 => cudarc::cublas::sys::cudaDataType::CUDA_R_16BF,
        }
    }
    /// A matrix-product output: its pointer and cuBLAS data type.
    pub fn output(&self, b: &mut CudaBuf) -> (u64, cudarc::cublas::sys::cudaDataType) {
        b.touch();
        let t = if b.is_bf16() { cudarc::cublas::sys::cudaDataType::CUDA_R_16BF } else { cudarc::cublas::sys::cudaDataType::CUDA_R_32F };
        (self.ptr(b), t)
    }
    fn expect_act(&self, b: &CudaBuf, what: &str) -> Result<()> {
        if b.is_bf16() != (self.precision == Precision::Bf16) {
            bail!("{what}: a {} buffer where the {:?} backend's kernels take activations (allocate it as BufKind::Activation)", b.dtype_name(), self.precision);
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

    /// A launch over `n` elements for a grid-stride kernel: 256 threads per
    /// block, at most 32 blocks per SM.
    pub fn grid_for(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count as usize * 32);
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// Copies `host` bytes into a reusable device buffer and runs `f` on it.
    pub fn with_device_bytes<R>(&self, host: &[u8], f: impl FnOnce(&CudaSlice<u8>) -> Result<R>) -> Result<R> {
        let mut guard = self.bytes_scratch.lock().map_err(|_| anyhow!("image byte buffer lock poisoned"))?;
        let buf = scratch(&self.stream, &mut guard, host.len().max(1), "image bytes")?;
        self.stream.memcpy_htod(host, &mut buf.slice_mut(..host.len())).map_err(|e| alloc_error(e, host.len(), "image bytes"))?;
        f(buf)
    }

    /// Copies `labels` into a reusable device buffer and runs `f` on it.
    pub fn with_device_labels<R>(&self, labels: &[u32], f: impl FnOnce(&CudaSlice<u32>) -> Result<R>) -> Result<R> {
        let mut guard = self.labels_scratch.lock().map_err(|_| anyhow!("label buffer lock poisoned"))?;
        let buf = scratch(&self.stream, &mut guard, labels.len().max(1), "labels")?;
        if !labels.is_empty() {
            self.stream.memcpy_htod(labels, &mut buf.slice_mut(..labels.len())).map_err(|e| alloc_error(e, labels.len(), "labels"))?;
        }
        f(buf)
    }
}

/// The buffer in `slot`, grown to at least `len` elements.
fn scratch<'a, T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(stream: &Arc<CudaStream>, slot: &'a mut Option<CudaSlice<T>>, len: usize, what: &str) -> Result<&'a mut CudaSlice<T>> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = Some(stream.alloc_zeros::<T>(len).map_err(|e| alloc_error(e, len, what))?);
    }
    slot.as_mut().ok_or_else(|| anyhow!("{what}: scratch buffer missing"))
}

/// Loads every embedded PTX module and returns its kernels by name.
fn load_kernels(ctx: &Arc<CudaContext>, max_smem: usize) -> Result<HashMap<String, CudaFunction>> {
    let mut functions = HashMap::new();
    for (file, ptx) in embedded_kernels() {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(*ptx)).map_err(|e| module_error(e, file))?;
        for name in entry_names(ptx) {
            let f = module.load_function(name).cu_with_context(|| format!("loading kernel {name} from the PTX {file}"))?;
            let base = name.trim_end_matches("_f32").trim_end_matches("_bf16");
            if LARGE_SMEM_KERNELS.contains(&base) {
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, max_smem as i32)
                    .cu_with_context(|| format!("allowing kernel {name} {max_smem} bytes of shared memory"))?;
            }
            functions.insert(name.to_string(), f);
        }
    }
    Ok(functions)
}

/// The `.entry` names declared in a PTX text.
fn entry_names(ptx: &str) -> impl Iterator<Item = &str> {
    ptx.lines().filter_map(|l| l.trim().strip_prefix(".visible .entry ")).filter_map(|rest| rest.split('(').next()).map(str::trim)
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
        anyhow!("GPU out of memory allocating {what} ({:.2} GiB); try a smaller --batch", len as f64 * 4.0 / (1u64 << 30) as f64)
    } else {
        anyhow!("CUDA error allocating {what} ({len} elements): {e:?}")
    }
}

fn check(name: &str, buf: &CudaBuf, need: usize) -> Result<()> {
    if buf.len() < need {
        bail!("{name}: buffer of {} elements, the operation needs {need}", buf.len());
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;

    fn name(&self) -> String {
        let p = match self.precision {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16 mixed precision",
        };
        format!("cuda ({}, {p})", self.device_name)
    }

    fn alloc(&self, len: usize, kind: BufKind) -> Result<CudaBuf> {
        let bf16 = kind == BufKind::Activation && self.precision == Precision::Bf16;
        let store = if bf16 {
            Store::Bf16(if len == 0 { self.stream.null::<u16>().cu_context("creating an empty GPU buffer")? } else { self.stream.alloc_zeros::<u16>(len).map_err(|e| alloc_error(e, len, "a buffer"))? })
        } else {
            Store::F32(if len == 0 { self.stream.null::<f32>().cu_context("creating an empty GPU buffer")? } else { self.stream.alloc_zeros::<f32>(len).map_err(|e| alloc_error(e, len, "a buffer"))? })
        };
        Ok(CudaBuf { store, shadow: Mutex::new(Shadow::default()) })
    }
    fn upload(&self, host: &[f32], kind: BufKind) -> Result<CudaBuf> {
        let mut buf = self.alloc(host.len(), kind)?;
        self.write(&mut buf, host)?;
        Ok(buf)
    }
    fn write(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
        check("write", buf, host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        buf.touch();
        match &mut buf.store {
            Store::F32(s) => self.stream.memcpy_htod(host, &mut s.slice_mut(..host.len())).cu_context("copying to the GPU"),
            Store::Bf16(s) => {
                let bits: Vec<u16> = host.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
                self.stream.memcpy_htod(&bits, &mut s.slice_mut(..host.len())).cu_context("copying to the GPU")
            }
        }
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        match &buf.store {
            Store::F32(s) => self.stream.clone_dtoh(s).cu_context("copying from the GPU"),
            Store::Bf16(s) => Ok(self.stream.clone_dtoh(s).cu_context("copying from the GPU")?.into_iter().map(|b| bf16::from_bits(b).to_f32()).collect()),
        }
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn zero(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        check("zero", buf, len)?;
        if len == 0 {
            return Ok(());
        }
        buf.touch();
        match &mut buf.store {
            Store::F32(s) => self.stream.memset_zeros(&mut s.slice_mut(..len)),
            Store::Bf16(s) => self.stream.memset_zeros(&mut s.slice_mut(..len)),
        }
        .cu_context("zeroing a GPU buffer")
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        check("copy dst", dst, len)?;
        check("copy src", src, len)?;
        if len == 0 {
            return Ok(());
        }
        dst.touch();
        match (&mut dst.store, &src.store) {
            (Store::F32(d), Store::F32(s)) => self.stream.memcpy_dtod(&s.slice(..len), &mut d.slice_mut(..len)).cu_context("copying between GPU buffers"),
            (Store::Bf16(d), Store::Bf16(s)) => self.stream.memcpy_dtod(&s.slice(..len), &mut d.slice_mut(..len)).cu_context("copying between GPU buffers"),
            (Store::Bf16(d), Store::F32(s)) => ops::gelu::cuda::convert_f32_to_bf16(self, raw(d, &self.stream), raw(s, &self.stream), len),
            (Store::F32(_), Store::Bf16(_)) => bail!("copy: from a bf16 buffer into an fp32 one is not supported"),
        }
    }
    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
        check("add_assign dst", dst, len)?;
        check("add_assign src", src, len)?;
        ops::gelu::cuda::add_assign(self, dst, src, len)
    }

    fn matmul(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> Result<()> {
        check("matmul out", out, m * n)?;
        check("matmul a", a, m * k)?;
        check("matmul b", b, k * n)?;
        ops::matmul::cuda::matmul(self, out, a, b, m, n, k, trans_a, trans_b, accumulate)
    }
    fn linear_forward(&self, y: &mut CudaBuf, x: &CudaBuf, w: &CudaBuf, bias: &CudaBuf, rows: usize, inp: usize, out: usize) -> Result<()> {
        check("linear y", y, rows * out)?;
        check("linear x", x, rows * inp)?;
        check("linear w", w, out * inp)?;
        check("linear bias", bias, out)?;
        ops::matmul::cuda::linear_forward(self, y, x, w, bias, rows, inp, out)
    }
    fn lowrank_forward(&self, y: &mut CudaBuf, h: &mut CudaBuf, x: &CudaBuf, v: &CudaBuf, u: &CudaBuf, bias: &CudaBuf, rows: usize, inp: usize, rank: usize, out: usize) -> Result<()> {
        check("lowrank y", y, rows * out)?;
        check("lowrank h", h, rows * rank)?;
        check("lowrank x", x, rows * inp)?;
        check("lowrank v", v, rank * inp)?;
        check("lowrank u", u, out * rank)?;
        check("lowrank bias", bias, out)?;
        ops::lowrank::cuda::lowrank_forward(self, y, h, x, v, u, bias, rows, inp, rank, out)
    }
    fn bias_backward(&self, dbias: &mut CudaBuf, dy: &CudaBuf, rows: usize, cols: usize) -> Result<()> {
        check("bias_backward dbias", dbias, cols)?;
        check("bias_backward dy", dy, rows * cols)?;
        ops::matmul::cuda::bias_backward(self, dbias, dy, rows, cols)
    }

    fn gelu_forward(&self, out: &mut CudaBuf, x: &CudaBuf, len: usize) -> Result<()> {
        check("gelu out", out, len)?;
        check("gelu x", x, len)?;
        ops::gelu::cuda::gelu_forward(self, out, x, len)
    }
    fn gelu_backward(&self, dx: &mut CudaBuf, x: &CudaBuf, dout: &CudaBuf, len: usize) -> Result<()> {
        check("gelu dx", dx, len)?;
        check("gelu x", x, len)?;
        check("gelu dout", dout, len)?;
        ops::gelu::cuda::gelu_backward(self, dx, x, dout, len)
    }

    fn layernorm_forward(&self, out: &mut CudaBuf, mean: &mut CudaBuf, rstd: &mut CudaBuf, x: &CudaBuf, gamma: &CudaBuf, beta: &CudaBuf, rows: usize, cols: usize, eps: f32) -> Result<()> {
        check("layernorm out", out, rows * cols)?;
        check("layernorm x", x, rows * cols)?;
        check("layernorm mean", mean, rows)?;
        check("layernorm rstd", rstd, rows)?;
        check("layernorm gamma", gamma, cols)?;
        check("layernorm beta", beta, cols)?;
        ops::layernorm::cuda::layernorm_forward(self, out, mean, rstd, x, gamma, beta, rows, cols, eps)
    }
    fn layernorm_backward(&self, dx: &mut CudaBuf, dgamma: &mut CudaBuf, dbeta: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, mean: &CudaBuf, rstd: &CudaBuf, gamma: &CudaBuf, rows: usize, cols: usize) -> Result<()> {
        check("layernorm dx", dx, rows * cols)?;
        check("layernorm dout", dout, rows * cols)?;
        check("layernorm x", x, rows * cols)?;
        check("layernorm mean", mean, rows)?;
        check("layernorm rstd", rstd, rows)?;
        check("layernorm gamma", gamma, cols)?;
        check("layernorm dgamma", dgamma, cols)?;
        check("layernorm dbeta", dbeta, cols)?;
        ops::layernorm::cuda::layernorm_backward(self, dx, dgamma, dbeta, dout, x, mean, rstd, gamma, rows, cols)
    }

    fn attention_forward(&self, out: &mut CudaBuf, probs: &mut CudaBuf, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let n = batch * tokens * heads * head_dim;
        for (name, b) in [("attention q", q), ("attention k", k), ("attention v", v), ("attention out", &*out)] {
            check(name, b, n)?;
        }
        check("attention probs", probs, batch * heads * tokens * tokens)?;
        ops::attention::cuda::attention_forward(self, out, probs, q, k, v, batch, tokens, heads, head_dim)
    }
    fn attention_backward(&self, dq: &mut CudaBuf, dk: &mut CudaBuf, dv: &mut CudaBuf, dout: &CudaBuf, q: &CudaBuf, k: &CudaBuf, v: &CudaBuf, probs: &CudaBuf, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let n = batch * tokens * heads * head_dim;
        for (name, b) in [("attention dq", &*dq), ("attention dk", &*dk), ("attention dv", &*dv), ("attention dout", dout), ("attention q", q), ("attention k", k), ("attention v", v)] {
            check(name, b, n)?;
        }
        check("attention probs", probs, batch * heads * tokens * tokens)?;
        ops::attention::cuda::attention_backward(self, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim)
    }

    fn patch_gather(&self, patches: &mut CudaBuf, images: &CudaBuf, batch: usize, channels: usize, size: usize, patch: usize) -> Result<()> {
        if patch == 0 || !size.is_multiple_of(patch) {
            bail!("patch_gather: image size {size} is not a multiple of the patch size {patch}");
        }
        check("patch_gather images", images, batch * channels * size * size)?;
        check("patch_gather patches", patches, batch * channels * size * size)?;
        ops::embed::cuda::patch_gather(self, patches, images, batch, channels, size, patch)
    }
    fn tokens_forward(&self, x: &mut CudaBuf, patch_out: &CudaBuf, cls: &CudaBuf, pos: &CudaBuf, batch: usize, n_patches: usize, width: usize) -> Result<()> {
        check("tokens x", x, batch * (n_patches + 1) * width)?;
        check("tokens patch_out", patch_out, batch * n_patches * width)?;
        check("tokens cls", cls, width)?;
        check("tokens pos", pos, (n_patches + 1) * width)?;
        ops::embed::cuda::tokens_forward(self, x, patch_out, cls, pos, batch, n_patches, width)
    }
    fn tokens_backward(&self, dpatch_out: &mut CudaBuf, dcls: &mut CudaBuf, dpos: &mut CudaBuf, dx: &CudaBuf, batch: usize, n_patches: usize, width: usize) -> Result<()> {
        check("tokens dx", dx, batch * (n_patches + 1) * width)?;
        check("tokens dpatch_out", dpatch_out, batch * n_patches * width)?;
        check("tokens dcls", dcls, width)?;
        check("tokens dpos", dpos, (n_patches + 1) * width)?;
        ops::embed::cuda::tokens_backward(self, dpatch_out, dcls, dpos, dx, batch, n_patches, width)
    }
    fn cls_gather(&self, out: &mut CudaBuf, x: &CudaBuf, batch: usize, tokens: usize, width: usize) -> Result<()> {
        check("cls_gather x", x, batch * tokens * width)?;
        check("cls_gather out", out, batch * width)?;
        ops::embed::cuda::cls_gather(self, out, x, batch, tokens, width)
    }
    fn cls_scatter_add(&self, dx: &mut CudaBuf, dout: &CudaBuf, batch: usize, tokens: usize, width: usize) -> Result<()> {
        check("cls_scatter dx", dx, batch * tokens * width)?;
        check("cls_scatter dout", dout, batch * width)?;
        ops::embed::cuda::cls_scatter_add(self, dx, dout, batch, tokens, width)
    }

    fn images_from_bytes(&self, out: &mut CudaBuf, src: &[u8], batch: usize, t: &ImageTransform) -> Result<()> {
        if src.len() < batch * t.channels * t.src_height * t.src_width {
            bail!("images_from_bytes: {} bytes for {batch} images of {}x{}x{}", src.len(), t.channels, t.src_height, t.src_width);
        }
        if t.channels == 0 || t.channels > 3 {
            bail!("images_from_bytes: {} channels; 1 to 3 are supported", t.channels);
        }
        check("images_from_bytes out", out, batch * t.channels * t.dst_size * t.dst_size)?;
        ops::image::cuda::images_from_bytes(self, out, &src[..batch * t.channels * t.src_height * t.src_width], batch, t)
    }

    fn logit_loss(&self, ds: &mut CudaBuf, loss: &mut CudaBuf, s: &CudaBuf, teacher: Option<&CudaBuf>, labels: &[u32], batch: usize, classes: usize, cfg: &LogitLossConfig, scale: f32) -> Result<()> {
        check("logit_loss s", s, batch * classes)?;
        check("logit_loss ds", ds, batch * classes)?;
        check("logit_loss loss", loss, 1)?;
        if (cfg.kd_weight != 0.0 || cfg.feature_weight != 0.0) && teacher.is_none() {
            bail!("logit_loss: the KD or feature term needs teacher logits");
        }
        if let Some(t) = teacher {
            check("logit_loss teacher", t, batch * classes)?;
        }
        if cfg.ce_weight != 0.0 {
            if labels.len() < batch {
                bail!("logit_loss: {} labels for a batch of {batch}", labels.len());
            }
            if let Some(&bad) = labels[..batch].iter().find(|&&y| y as usize >= classes) {
                bail!("logit_loss: label {bad} out of range for {classes} classes");
            }
        }
        ops::loss::cuda::logit_loss(self, ds, loss, s, teacher, labels, batch, classes, cfg, scale)
    }
    fn feature_loss(&self, ds: &mut CudaBuf, loss: &mut CudaBuf, s: &CudaBuf, t: &CudaBuf, rows: usize, cols: usize, scale: f32) -> Result<()> {
        check("feature_loss s", s, rows * cols)?;
        check("feature_loss t", t, rows * cols)?;
        check("feature_loss ds", ds, rows * cols)?;
        check("feature_loss loss", loss, 1)?;
        ops::loss::cuda::feature_loss(self, ds, loss, s, t, rows, cols, scale)
    }

    fn sum_squares(&self, acc: &mut CudaBuf, x: &CudaBuf, len: usize) -> Result<()> {
        check("sum_squares x", x, len)?;
        check("sum_squares acc", acc, 1)?;
        ops::adamw::cuda::sum_squares(self, acc, x, len)
    }
    fn adamw_update(&self, param: &mut CudaBuf, grad: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, grad_norm_sq: &CudaBuf, len: usize, hp: &AdamWStep) -> Result<()> {
        for (name, b) in [("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)] {
            check(name, b, len)?;
        }
        check("grad_norm_sq", grad_norm_sq, 1)?;
        ops::adamw::cuda::adamw_update(self, param, grad, m, v, grad_norm_sq, len, hp)
    }
}
