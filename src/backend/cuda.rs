//! The CUDA backend: `CudaBackend` implements `Backend` with the kernels of
//! `kernels/*.cu` (compiled to PTX by `build.rs` with NVRTC and embedded in
//! the binary) and cuBLAS for the matrix products.
//!
//! Precision: every buffer is fp32 (`BufKind` is accepted and ignored), and
//! every matrix product is a plain fp32 cuBLAS SGEMM (default math mode, no
//! TF32), so results match the CPU reference to fp32 rounding. Reductions
//! that the CPU sums in f64 (losses, the gradient norm) are summed in fp64
//! on the device too.
//!
//! Everything runs in order on the context's default stream; the only host
//! synchronizations are `download` and the host-to-device copies of the
//! per-batch inputs (image bytes, labels), which the caller hands over as
//! host slices anyway. Each operation's launcher lives in
//! `src/ops/<op>/cuda.rs`; this file holds device setup, memory, and the
//! `Backend` glue with its shape checks.

use super::{AdamWStep, Backend, BufKind, ImageTransform, LogitLossConfig};
use crate::ops;
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUresult};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig};
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
const LARGE_SMEM_KERNELS: [&str; 3] = ["attention_forward", "attention_backward", "lowrank_forward"];

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

/// The CUDA backend on one device (see the module doc for precision).
pub struct CudaBackend {
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
    /// Opens device `device`, loads every embedded kernel and a cuBLAS handle.
    pub fn new(device: usize) -> Result<Self> {
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
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        let attr = |a| ctx.attribute(a).map_err(|e| anyhow!("reading device attribute {a:?}: {e:?}"));
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let functions = load_kernels(&ctx, max_smem)?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Ok(CudaBackend { ctx, stream, blas, functions, device_name, sm_count, max_smem, bytes_scratch: Mutex::new(None), labels_scratch: Mutex::new(None) })
    }

    /// The kernel called `name` (an `extern "C"` function of `kernels/`).
    pub fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| anyhow!("CUDA kernel {name} is not among the embedded kernels"))
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
            let f = module.load_function(name).cu_with_context(|| format!("loading kernel {name} from kernels/{file}.cu"))?;
            if LARGE_SMEM_KERNELS.contains(&name) {
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
        anyhow!("the CUDA driver is too old for the embedded kernels (kernels/{file}.cu, PTX ISA 9.0 from NVRTC 13.0): update the NVIDIA driver to 580 or newer, or use --device cpu")
    } else {
        anyhow!("loading the PTX of kernels/{file}.cu: {e:?}")
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

fn check(name: &str, buf: &CudaSlice<f32>, need: usize) -> Result<()> {
    if buf.len() < need {
        bail!("{name}: buffer of {} elements, the operation needs {need}", buf.len());
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        format!("cuda ({})", self.device_name)
    }

    fn alloc(&self, len: usize, _kind: BufKind) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return self.stream.null::<f32>().cu_context("creating an empty GPU buffer");
        }
        self.stream.alloc_zeros::<f32>(len).map_err(|e| alloc_error(e, len, "a buffer"))
    }
    fn upload(&self, host: &[f32], kind: BufKind) -> Result<CudaSlice<f32>> {
        let mut buf = self.alloc(host.len(), kind)?;
        self.write(&mut buf, host)?;
        Ok(buf)
    }
    fn write(&self, buf: &mut CudaSlice<f32>, host: &[f32]) -> Result<()> {
        check("write", buf, host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        self.stream.memcpy_htod(host, &mut buf.slice_mut(..host.len())).cu_context("copying to the GPU")
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buf).cu_context("copying from the GPU")
    }
    fn len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn zero(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
        check("zero", buf, len)?;
        if len == 0 {
            return Ok(());
        }
        self.stream.memset_zeros(&mut buf.slice_mut(..len)).cu_context("zeroing a GPU buffer")
    }
    fn copy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, len: usize) -> Result<()> {
        check("copy dst", dst, len)?;
        check("copy src", src, len)?;
        if len == 0 {
            return Ok(());
        }
        self.stream.memcpy_dtod(&src.slice(..len), &mut dst.slice_mut(..len)).cu_context("copying between GPU buffers")
    }
    fn add_assign(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, len: usize) -> Result<()> {
        check("add_assign dst", dst, len)?;
        check("add_assign src", src, len)?;
        ops::gelu::cuda::add_assign(self, dst, src, len)
    }

    fn matmul(&self, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> Result<()> {
        check("matmul out", out, m * n)?;
        check("matmul a", a, m * k)?;
        check("matmul b", b, k * n)?;
        ops::matmul::cuda::matmul(self, out, a, b, m, n, k, trans_a, trans_b, accumulate)
    }
    fn linear_forward(&self, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, inp: usize, out: usize) -> Result<()> {
        check("linear y", y, rows * out)?;
        check("linear x", x, rows * inp)?;
        check("linear w", w, out * inp)?;
        check("linear bias", bias, out)?;
        ops::matmul::cuda::linear_forward(self, y, x, w, bias, rows, inp, out)
    }
    fn lowrank_forward(&self, y: &mut CudaSlice<f32>, h: &mut CudaSlice<f32>, x: &CudaSlice<f32>, v: &CudaSlice<f32>, u: &CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, inp: usize, rank: usize, out: usize) -> Result<()> {
        check("lowrank y", y, rows * out)?;
        check("lowrank h", h, rows * rank)?;
        check("lowrank x", x, rows * inp)?;
        check("lowrank v", v, rank * inp)?;
        check("lowrank u", u, out * rank)?;
        check("lowrank bias", bias, out)?;
        ops::lowrank::cuda::lowrank_forward(self, y, h, x, v, u, bias, rows, inp, rank, out)
    }
    fn bias_backward(&self, dbias: &mut CudaSlice<f32>, dy: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
        check("bias_backward dbias", dbias, cols)?;
        check("bias_backward dy", dy, rows * cols)?;
        ops::matmul::cuda::bias_backward(self, dbias, dy, rows, cols)
    }

    fn gelu_forward(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) -> Result<()> {
        check("gelu out", out, len)?;
        check("gelu x", x, len)?;
        ops::gelu::cuda::gelu_forward(self, out, x, len)
    }
    fn gelu_backward(&self, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>, len: usize) -> Result<()> {
        check("gelu dx", dx, len)?;
        check("gelu x", x, len)?;
        check("gelu dout", dout, len)?;
        ops::gelu::cuda::gelu_backward(self, dx, x, dout, len)
    }

    fn layernorm_forward(&self, out: &mut CudaSlice<f32>, mean: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, rows: usize, cols: usize, eps: f32) -> Result<()> {
        check("layernorm out", out, rows * cols)?;
        check("layernorm x", x, rows * cols)?;
        check("layernorm mean", mean, rows)?;
        check("layernorm rstd", rstd, rows)?;
        check("layernorm gamma", gamma, cols)?;
        check("layernorm beta", beta, cols)?;
        ops::layernorm::cuda::layernorm_forward(self, out, mean, rstd, x, gamma, beta, rows, cols, eps)
    }
    fn layernorm_backward(&self, dx: &mut CudaSlice<f32>, dgamma: &mut CudaSlice<f32>, dbeta: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, x: &CudaSlice<f32>, mean: &CudaSlice<f32>, rstd: &CudaSlice<f32>, gamma: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
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

    fn attention_forward(&self, out: &mut CudaSlice<f32>, probs: &mut CudaSlice<f32>, q: &CudaSlice<f32>, k: &CudaSlice<f32>, v: &CudaSlice<f32>, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let n = batch * tokens * heads * head_dim;
        for (name, b) in [("attention q", q), ("attention k", k), ("attention v", v), ("attention out", &*out)] {
            check(name, b, n)?;
        }
        check("attention probs", probs, batch * heads * tokens * tokens)?;
        ops::attention::cuda::attention_forward(self, out, probs, q, k, v, batch, tokens, heads, head_dim)
    }
    fn attention_backward(&self, dq: &mut CudaSlice<f32>, dk: &mut CudaSlice<f32>, dv: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, q: &CudaSlice<f32>, k: &CudaSlice<f32>, v: &CudaSlice<f32>, probs: &CudaSlice<f32>, batch: usize, tokens: usize, heads: usize, head_dim: usize) -> Result<()> {
        let n = batch * tokens * heads * head_dim;
        for (name, b) in [("attention dq", &*dq), ("attention dk", &*dk), ("attention dv", &*dv), ("attention dout", dout), ("attention q", q), ("attention k", k), ("attention v", v)] {
            check(name, b, n)?;
        }
        check("attention probs", probs, batch * heads * tokens * tokens)?;
        ops::attention::cuda::attention_backward(self, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim)
    }

    fn patch_gather(&self, patches: &mut CudaSlice<f32>, images: &CudaSlice<f32>, batch: usize, channels: usize, size: usize, patch: usize) -> Result<()> {
        if patch == 0 || size % patch != 0 {
            bail!("patch_gather: image size {size} is not a multiple of the patch size {patch}");
        }
        check("patch_gather images", images, batch * channels * size * size)?;
        check("patch_gather patches", patches, batch * channels * size * size)?;
        ops::embed::cuda::patch_gather(self, patches, images, batch, channels, size, patch)
    }
    fn tokens_forward(&self, x: &mut CudaSlice<f32>, patch_out: &CudaSlice<f32>, cls: &CudaSlice<f32>, pos: &CudaSlice<f32>, batch: usize, n_patches: usize, width: usize) -> Result<()> {
        check("tokens x", x, batch * (n_patches + 1) * width)?;
        check("tokens patch_out", patch_out, batch * n_patches * width)?;
        check("tokens cls", cls, width)?;
        check("tokens pos", pos, (n_patches + 1) * width)?;
        ops::embed::cuda::tokens_forward(self, x, patch_out, cls, pos, batch, n_patches, width)
    }
    fn tokens_backward(&self, dpatch_out: &mut CudaSlice<f32>, dcls: &mut CudaSlice<f32>, dpos: &mut CudaSlice<f32>, dx: &CudaSlice<f32>, batch: usize, n_patches: usize, width: usize) -> Result<()> {
        check("tokens dx", dx, batch * (n_patches + 1) * width)?;
        check("tokens dpatch_out", dpatch_out, batch * n_patches * width)?;
        check("tokens dcls", dcls, width)?;
        check("tokens dpos", dpos, (n_patches + 1) * width)?;
        ops::embed::cuda::tokens_backward(self, dpatch_out, dcls, dpos, dx, batch, n_patches, width)
    }
    fn cls_gather(&self, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, batch: usize, tokens: usize, width: usize) -> Result<()> {
        check("cls_gather x", x, batch * tokens * width)?;
        check("cls_gather out", out, batch * width)?;
        ops::embed::cuda::cls_gather(self, out, x, batch, tokens, width)
    }
    fn cls_scatter_add(&self, dx: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, batch: usize, tokens: usize, width: usize) -> Result<()> {
        check("cls_scatter dx", dx, batch * tokens * width)?;
        check("cls_scatter dout", dout, batch * width)?;
        ops::embed::cuda::cls_scatter_add(self, dx, dout, batch, tokens, width)
    }

    fn images_from_bytes(&self, out: &mut CudaSlice<f32>, src: &[u8], batch: usize, t: &ImageTransform) -> Result<()> {
        if src.len() < batch * t.channels * t.src_height * t.src_width {
            bail!("images_from_bytes: {} bytes for {batch} images of {}x{}x{}", src.len(), t.channels, t.src_height, t.src_width);
        }
        if t.channels == 0 || t.channels > 3 {
            bail!("images_from_bytes: {} channels; 1 to 3 are supported", t.channels);
        }
        check("images_from_bytes out", out, batch * t.channels * t.dst_size * t.dst_size)?;
        ops::image::cuda::images_from_bytes(self, out, &src[..batch * t.channels * t.src_height * t.src_width], batch, t)
    }

    fn logit_loss(&self, ds: &mut CudaSlice<f32>, loss: &mut CudaSlice<f32>, s: &CudaSlice<f32>, teacher: Option<&CudaSlice<f32>>, labels: &[u32], batch: usize, classes: usize, cfg: &LogitLossConfig, scale: f32) -> Result<()> {
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
    fn feature_loss(&self, ds: &mut CudaSlice<f32>, loss: &mut CudaSlice<f32>, s: &CudaSlice<f32>, t: &CudaSlice<f32>, rows: usize, cols: usize, scale: f32) -> Result<()> {
        check("feature_loss s", s, rows * cols)?;
        check("feature_loss t", t, rows * cols)?;
        check("feature_loss ds", ds, rows * cols)?;
        check("feature_loss loss", loss, 1)?;
        ops::loss::cuda::feature_loss(self, ds, loss, s, t, rows, cols, scale)
    }

    fn sum_squares(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) -> Result<()> {
        check("sum_squares x", x, len)?;
        check("sum_squares acc", acc, 1)?;
        ops::adamw::cuda::sum_squares(self, acc, x, len)
    }
    fn adamw_update(&self, param: &mut CudaSlice<f32>, grad: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, grad_norm_sq: &CudaSlice<f32>, len: usize, hp: &AdamWStep) -> Result<()> {
        for (name, b) in [("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)] {
            check(name, b, len)?;
        }
        check("grad_norm_sq", grad_norm_sq, 1)?;
        ops::adamw::cuda::adamw_update(self, param, grad, m, v, grad_norm_sq, len, hp)
    }
}
