//! Launcher of the fused low-rank forward (`kernels/lowrank.cu`):
//! `h = x Vᵀ`, `y = h Uᵀ + b` with the h tile kept in shared memory, for
//! rank ≤ 256. The bf16 kernels run on tensor cores; the fp32 kernel is the
//! SIMT reference. The engine uses the fused kernel where it is faster than
//! two cuBLAS GEMMs (`FUSED_FASTER_MAX_RANK`) and the GEMM pair elsewhere;
//! both give the same result, and the pair is the benchmark baseline.

use super::{LowRankKernel, LowRankShape, LowRankWeights};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::{Cuda, Device, Precision};
use crate::ops::matmul::cuda::{gemm, linear_forward, operand, output, RowMajorGemm};
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "lowrank";
    FUSED = "lowrank_forward",
    ALIGNED = "lowrank_forward_aligned" (bf16),
}

/// Largest rank the fused kernel handles.
pub const MAX_FUSED_RANK: usize = 256;

/// Rows of x per block, threads per block and dynamic shared memory (bytes)
/// of the fused kernel for `rank` (the layout in kernels/lowrank.cu).
pub fn fused_launch(precision: Precision, rank: usize) -> (usize, usize, usize) {
    match precision {
        // fp32 SIMT: h tile [32][rank+1], x tile [32][33], weight tile [256][33].
        Precision::F32 => (32, 256, 4 * (32 * (rank + 1) + 32 * 33 + 256 * 33)),
        Precision::Bf16 => bf16_launch(rank),
    }
}

/// The tensor-core kernel (kernels/lowrank.cu, bf16 variant): 64 rows and
/// 256 threads per block; shared memory for R = rank rounded up to 16: an
/// fp32 staging tile [64][max(R,128)+4], h in bf16 [64][R+8], and the k-chunk
/// tiles [64 + max(R,128)][40] in bf16.
pub fn bf16_launch(rank: usize) -> (usize, usize, usize) {
    let r = rank.div_ceil(16) * 16;
    let wide = r.max(128);
    (
        64,
        256,
        4 * 64 * (wide + 4) + 2 * 64 * (r + 8) + 2 * 40 * (64 + wide),
    )
}

/// The aligned bf16 kernel: 64 rows, 256 threads; a 16×16 fp32 staging tile
/// per warp, the x chunk [64][264] and V chunk [rank][264] in bf16 (the U
/// chunk [128][rank+8] reuses the V space), h in bf16 [64][rank+8].
pub fn aligned_launch(rank: usize) -> (usize, usize, usize) {
    (
        64,
        256,
        8 * 16 * 16 * 4 + 2 * 64 * 264 + 2 * rank * 264 + 2 * 64 * (rank + 8),
    )
}

/// Largest rank at which the engine runs the fused kernel (bf16, aligned
/// shapes). Measured on an H100 (bench/RESULTS.md, `cargo bench --bench
/// kernels`, 12,800 rows, width 768): the fused kernel beats the two cuBLAS
/// GEMMs at rank 16 and ties near rank 32; from rank 64 up cuBLAS is faster,
/// so larger ranks, ragged shapes and fp32 take the cuBLAS pair.
pub const FUSED_FASTER_MAX_RANK: usize = 32;

impl LowRankKernel for Cuda {
    /// The faster of the fused kernel and the cuBLAS pair for this shape
    /// and precision (see FUSED_FASTER_MAX_RANK).
    fn lowrank_forward(
        &self,
        y: &mut CudaBuf,
        h: &mut CudaBuf,
        x: &CudaBuf,
        w: LowRankWeights<'_, CudaBuf>,
        s: LowRankShape,
        ok: Checked,
    ) -> Result<()> {
        let aligned = s.dims().iter().all(|d| d % 16 == 0);
        if self.precision() == Precision::Bf16 && aligned && s.rank <= FUSED_FASTER_MAX_RANK {
            lowrank_forward_fused(self, y, h, x, w, s, ok)
        } else {
            unfused(self, y, h, x, w, s, ok)
        }
    }
}

/// The fused kernel for any shape with rank ≤ 256 (the cuBLAS pair beyond,
/// or where the device has too little shared memory): `lowrank_forward` or
/// `lowrank_forward_aligned`, both `(act_t* y, act_t* h, const act_t* x,
/// const act_t* v, const act_t* u, const float* bias, int rows, int inp,
/// int rank, int out)`.
pub fn lowrank_forward_fused(
    be: &Cuda,
    y: &mut CudaBuf,
    h: &mut CudaBuf,
    x: &CudaBuf,
    w: LowRankWeights<'_, CudaBuf>,
    s: LowRankShape,
    ok: Checked,
) -> Result<()> {
    let LowRankShape {
        rows,
        inp,
        rank,
        out,
    } = s;
    if rank == 0 || rank > MAX_FUSED_RANK || inp == 0 {
        return unfused(be, y, h, x, w, s, ok);
    }
    // bf16 with every dimension a multiple of 16: the kernel that loads its
    // tensor-core fragments straight from global memory.
    let aligned = be.precision() == Precision::Bf16 && s.dims().iter().all(|d| d % 16 == 0);
    let (kernel, (rows_per_block, threads, smem)) = if aligned {
        (ALIGNED, aligned_launch(rank))
    } else {
        (FUSED, fused_launch(be.precision(), rank))
    };
    if smem > be.max_shared_bytes() {
        return unfused(be, y, h, x, w, s, ok);
    }
    if rows * out == 0 {
        return Ok(());
    }
    let a = s.dims().map(|v| v as i32);
    let (yp, hp, xp) = (
        be.act_mut(y, "lowrank y")?,
        be.act_mut(h, "lowrank h")?,
        be.act(x, "lowrank x")?,
    );
    let (vp, up, bp) = (
        be.operand(w.v, "lowrank V")?,
        be.operand(w.u, "lowrank U")?,
        be.f32(w.bias, "lowrank bias")?,
    );
    let cfg = Cuda::tiled_config(rows.div_ceil(rows_per_block), threads, smem);
    let f = be.function(kernel, smem)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&yp)
        .arg(&hp)
        .arg(&xp)
        .arg(&vp)
        .arg(&up)
        .arg(&bp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2])
        .arg(&a[3]);
    unsafe { l.launch(cfg) }.cu_with_context(|| {
        format!(
            "{} launch (rows {rows}, in {inp}, rank {rank}, out {out})",
            kernel.name()
        )
    })?;
    Ok(())
}

/// The two-GEMM path: `h = x Vᵀ` then `y = h Uᵀ + b` (also the benchmark baseline).
pub fn unfused(
    be: &Cuda,
    y: &mut CudaBuf,
    h: &mut CudaBuf,
    x: &CudaBuf,
    w: LowRankWeights<'_, CudaBuf>,
    s: LowRankShape,
    _: Checked,
) -> Result<()> {
    if s.inp == 0 {
        be.zero(h, s.rows * s.rank)?;
    } else {
        let (xm, vm) = (operand(be, x, "lowrank x")?, operand(be, w.v, "lowrank V")?);
        gemm(be, output(be, h), xm, vm, &RowMajorGemm::plain(s.first()))?;
    }
    linear_forward(be, y, h, w.u, w.bias, s.second())
}
