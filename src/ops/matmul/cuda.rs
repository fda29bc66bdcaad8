//! Matrix products on the GPU through cuBLAS SGEMM (fp32, no TF32), and
//! the bias kernels of dense layers (`kernels/elementwise.cu`).
//!
//! cuBLAS is column-major; a row-major `C[m, n] = op(A) · op(B)` is the
//! column-major `Cᵀ = op(B)ᵀ · op(A)ᵀ`, so every call swaps the operands
//! and passes the row strides as leading dimensions.

use crate::backend::cuda::{CudaBackend, DriverResultExt};
use anyhow::{anyhow, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// A row-major (possibly batched, strided) product
/// `C[m, n] = alpha · op(A) · op(B) + beta · C`; `lda`, `ldb`, `ldc` are the
/// row strides of the stored matrices, `stride_*` the distances between
/// consecutive matrices of the batch.
#[derive(Clone, Copy, Debug)]
pub struct RowMajorGemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl RowMajorGemm {
    /// One contiguous product `[m, k] · [k, n]` with optional transposes.
    pub fn plain(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, beta: f32) -> Self {
        let lda = if trans_a { m } else { k };
        let ldb = if trans_b { k } else { n };
        RowMajorGemm { m, n, k, trans_a, trans_b, lda, ldb, ldc: n, alpha: 1.0, beta, batch: 1, stride_a: 0, stride_b: 0, stride_c: 0 }
    }
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// Runs `g` on cuBLAS. The caller guarantees the buffers hold the shapes.
pub fn gemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(be: &CudaBackend, c: &mut C, a: &A, b: &B, g: &RowMajorGemm) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let int = |v: usize, what: &str| i32::try_from(v.max(1)).map_err(|_| anyhow!("gemm: {what} = {v} exceeds the cuBLAS int range"));
    let cfg = GemmConfig {
        transa: op(g.trans_b),
        transb: op(g.trans_a),
        m: int(g.n, "n")?,
        n: int(g.m, "m")?,
        k: g.k as i32,
        alpha: g.alpha,
        lda: int(g.ldb, "ldb")?,
        ldb: int(g.lda, "lda")?,
        beta: g.beta,
        ldc: int(g.ldc, "ldc")?,
    };
    let batched = StridedBatchedConfig { gemm: cfg, batch_size: int(g.batch, "batch")?, stride_a: g.stride_b as i64, stride_b: g.stride_a as i64, stride_c: g.stride_c as i64 };
    unsafe { be.blas().gemm_strided_batched(batched, b, a, c) }.map_err(|e| anyhow!("cuBLAS SGEMM {g:?}: {e:?}"))
}

#[allow(clippy::too_many_arguments)]
pub fn matmul(be: &CudaBackend, out: &mut CudaSlice<f32>, a: &CudaSlice<f32>, b: &CudaSlice<f32>, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool) -> Result<()> {
    if k == 0 {
        if !accumulate && m * n > 0 {
            be.stream().memset_zeros(&mut out.slice_mut(..m * n)).cu_context("matmul with k = 0: zeroing out")?;
        }
        return Ok(());
    }
    gemm(be, out, a, b, &RowMajorGemm::plain(m, n, k, trans_a, trans_b, if accumulate { 1.0 } else { 0.0 }))
}

/// Writes `y = x · wᵀ + bias`: bias broadcast, then SGEMM with beta = 1.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(be: &CudaBackend, y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: &CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, inp: usize, out: usize) -> Result<()> {
    broadcast_rows(be, y, bias, rows, out)?;
    if inp == 0 {
        return Ok(());
    }
    gemm(be, y, x, w, &RowMajorGemm::plain(rows, out, inp, false, true, 1.0))
}

/// Fills every row of `y[rows, cols]` with `bias`.
pub fn broadcast_rows(be: &CudaBackend, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let mut l = be.stream().launch_builder(be.func("broadcast_rows")?);
    l.arg(y).arg(bias).arg(&r).arg(&c);
    unsafe { l.launch(be.grid_for(rows * cols)) }.cu_with_context(|| format!("broadcast_rows launch [{rows}, {cols}]"))?;
    Ok(())
}

/// Rows summed by one block of the column-sum kernels (bias, LayerNorm).
pub const ROWS_PER_BLOCK: usize = 256;

/// Grid and block of the column-sum kernels: 32 columns × 8 row lanes per
/// block, `ROWS_PER_BLOCK` rows per block.
pub fn column_sum_config(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 }
}

pub fn bias_backward(be: &CudaBackend, dbias: &mut CudaSlice<f32>, dy: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c, rpb) = (rows as i32, cols as i32, ROWS_PER_BLOCK as i32);
    let mut l = be.stream().launch_builder(be.func("bias_backward")?);
    l.arg(dbias).arg(dy).arg(&r).arg(&c).arg(&rpb);
    unsafe { l.launch(column_sum_config(rows, cols)) }.cu_with_context(|| format!("bias_backward launch [{rows}, {cols}]"))?;
    Ok(())
}
