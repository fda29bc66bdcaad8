//! Matrix products on the GPU through cuBLAS GemmEx (bf16 or fp32 operands,
//! fp32 accumulation; fp32 mode is plain fp32 without TF32), and
//! the bias kernels of dense layers (`kernels/matmul.cu`).
//!
//! cuBLAS is column-major; a row-major `C[m, n] = op(A) · op(B)` is the
//! column-major `Cᵀ = op(B)ᵀ · op(A)ᵀ`, so every call swaps the operands
//! and passes the row strides as leading dimensions.

use super::{DenseShape, Gemm, MatmulKernel};
use crate::device::cuda::{CudaBuf, DriverResultExt, COLUMN_SUM_ROWS_PER_BLOCK};
use crate::device::{Cuda, Device};
use crate::ops::Checked;
use anyhow::{anyhow, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "matmul";
    BROADCAST_ROWS = "broadcast_rows",
    BIAS_BACKWARD = "bias_backward",
}

/// A matrix in device memory for cuBLAS: address and element type.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: u64,
    pub dtype: cudaDataType,
}

impl Mat {
    /// The same matrix starting `elems` elements further on.
    pub fn at(self, elems: usize) -> Mat {
        let size = if self.dtype == cudaDataType::CUDA_R_16BF {
            2
        } else {
            4
        };
        Mat {
            ptr: self.ptr + (elems * size) as u64,
            dtype: self.dtype,
        }
    }
}

/// An operand of a product (an activation, or a weight through its bf16 copy in bf16 mode).
pub fn operand(be: &Cuda, b: &CudaBuf, what: &str) -> Result<Mat> {
    Ok(Mat {
        ptr: be.operand(b, what)?,
        dtype: be.operand_type(),
    })
}

/// The output of a product, in its own storage type (fp32 gradients of
/// weights, activations in the backend's activation type).
pub fn output(be: &Cuda, b: &mut CudaBuf) -> Mat {
    let (ptr, dtype) = be.output(b);
    Mat { ptr, dtype }
}

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
    /// One contiguous product as `g` describes it (beta 1 when it adds to C, else 0).
    pub fn plain(g: Gemm) -> Self {
        let (trans_a, trans_b) = (g.a.is_transposed(), g.b.is_transposed());
        let lda = if trans_a { g.m } else { g.k };
        let ldb = if trans_b { g.k } else { g.n };
        RowMajorGemm {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a,
            trans_b,
            lda,
            ldb,
            ldc: g.n,
            alpha: 1.0,
            beta: if g.accumulate.adds() { 1.0 } else { 0.0 },
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }
}

fn op(trans: bool) -> cublasOperation_t {
    if trans {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// Runs `g` on cuBLAS (`GemmStridedBatchedEx`, fp32 compute and
/// accumulation whatever the storage types). The caller guarantees the
/// buffers hold the shapes.
pub fn gemm(be: &Cuda, c: Mat, a: Mat, b: Mat, g: &RowMajorGemm) -> Result<()> {
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let int = |v: usize, what: &str| {
        i32::try_from(v.max(1))
            .map_err(|_| anyhow!("gemm: {what} = {v} exceeds the cuBLAS int range"))
    };
    let (m, n, k) = (int(g.n, "n")?, int(g.m, "m")?, g.k as i32);
    let (lda, ldb, ldc) = (int(g.ldb, "ldb")?, int(g.lda, "lda")?, int(g.ldc, "ldc")?);
    let batch = int(g.batch, "batch")?;
    // SAFETY: shapes and strides are checked by the callers against the
    // buffer lengths; alpha and beta are fp32 as compute type 32F requires.
    unsafe {
        cudarc::cublas::result::gemm_strided_batched_ex(
            *be.blas().handle(),
            op(g.trans_b),
            op(g.trans_a),
            m,
            n,
            k,
            (&g.alpha) as *const f32 as *const _,
            b.ptr as *const _,
            b.dtype,
            lda,
            g.stride_b as i64,
            a.ptr as *const _,
            a.dtype,
            ldb,
            g.stride_a as i64,
            (&g.beta) as *const f32 as *const _,
            c.ptr as *mut _,
            c.dtype,
            ldc,
            g.stride_c as i64,
            batch,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| {
        anyhow!(
            "cuBLAS GemmEx {g:?} ({:?} x {:?} -> {:?}): {e:?}",
            a.dtype,
            b.dtype,
            c.dtype
        )
    })
}

impl MatmulKernel for Cuda {
    fn matmul(
        &self,
        out: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        g: Gemm,
        _: Checked,
    ) -> Result<()> {
        if g.k == 0 {
            if !g.accumulate.adds() && g.m * g.n > 0 {
                self.zero(out, g.m * g.n)?;
            }
            return Ok(());
        }
        let (a, b) = (operand(self, a, "matmul a")?, operand(self, b, "matmul b")?);
        gemm(self, output(self, out), a, b, &RowMajorGemm::plain(g))
    }
    fn linear_forward(
        &self,
        y: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        bias: &CudaBuf,
        s: DenseShape,
        _: Checked,
    ) -> Result<()> {
        linear_forward(self, y, x, w, bias, s)
    }
    fn bias_backward(
        &self,
        dbias: &mut CudaBuf,
        dy: &CudaBuf,
        rows: usize,
        cols: usize,
        _: Checked,
    ) -> Result<()> {
        bias_backward(self, dbias, dy, rows, cols)
    }
}

/// Writes `y = x · wᵀ + bias`: bias broadcast, then a GEMM with beta = 1.
pub fn linear_forward(
    be: &Cuda,
    y: &mut CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    bias: &CudaBuf,
    s: DenseShape,
) -> Result<()> {
    broadcast_rows(be, y, bias, s.rows, s.out)?;
    if s.inp == 0 {
        return Ok(());
    }
    let (x, w) = (operand(be, x, "linear x")?, operand(be, w, "linear w")?);
    gemm(
        be,
        output(be, y),
        x,
        w,
        &RowMajorGemm::plain(s.gemm().add()),
    )
}

/// `broadcast_rows(act_t* y, const float* bias, int rows, int cols)`:
/// fills every row of `y[rows, cols]` with `bias`.
pub fn broadcast_rows(
    be: &Cuda,
    y: &mut CudaBuf,
    bias: &CudaBuf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (yp, bp) = (be.act_mut(y, "linear y")?, be.f32(bias, "linear bias")?);
    let f = be.function(BROADCAST_ROWS, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&yp).arg(&bp).arg(&r).arg(&c);
    unsafe { l.launch(be.elementwise_config(rows * cols)) }
        .cu_with_context(|| format!("broadcast_rows launch [{rows}, {cols}]"))?;
    Ok(())
}

/// `bias_backward(float* dbias, const act_t* dy, int rows, int cols, int rows_per_block)`.
fn bias_backward(
    be: &Cuda,
    dbias: &mut CudaBuf,
    dy: &CudaBuf,
    rows: usize,
    cols: usize,
) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c, rpb) = (rows as i32, cols as i32, COLUMN_SUM_ROWS_PER_BLOCK as i32);
    let (dbp, dyp) = (
        be.f32_mut(dbias, "bias gradient")?,
        be.act(dy, "bias_backward dy")?,
    );
    let f = be.function(BIAS_BACKWARD, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dbp).arg(&dyp).arg(&r).arg(&c).arg(&rpb);
    unsafe { l.launch(Cuda::column_sum_config(rows, cols)) }
        .cu_with_context(|| format!("bias_backward launch [{rows}, {cols}]"))?;
    Ok(())
}
