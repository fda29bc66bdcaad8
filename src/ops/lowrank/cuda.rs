//! Launcher of the fused low-rank forward (`kernels/lowrank.cu`):
//! `h = x Vᵀ`, `y = h Uᵀ + b` with the h tile kept in shared memory, for
//! rank ≤ 256; larger ranks (or a device with too little shared memory) run
//! as two cuBLAS SGEMMs, which give the same result.

use crate::backend::cuda::{CudaBackend, DriverResultExt};
use crate::ops::matmul::cuda::{gemm, linear_forward, RowMajorGemm};
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Largest rank the fused kernel handles (its register tile covers 256 columns).
pub const MAX_FUSED_RANK: usize = 256;
const ROWS_PER_BLOCK: usize = 32;

/// Dynamic shared memory of the fused kernel for `rank`: the h tile
/// `[32][rank+1]`, the x tile `[32][33]` and the weight tile `[256][33]`.
pub fn fused_smem_bytes(rank: usize) -> usize {
    4 * (ROWS_PER_BLOCK * (rank + 1) + ROWS_PER_BLOCK * 33 + 256 * 33)
}

#[allow(clippy::too_many_arguments)]
pub fn lowrank_forward(be: &CudaBackend, y: &mut CudaSlice<f32>, h: &mut CudaSlice<f32>, x: &CudaSlice<f32>, v: &CudaSlice<f32>, u: &CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, inp: usize, rank: usize, out: usize) -> Result<()> {
    if rank == 0 || rank > MAX_FUSED_RANK || fused_smem_bytes(rank) > be.max_shared_bytes() || inp == 0 {
        return unfused(be, y, h, x, v, u, bias, rows, inp, rank, out);
    }
    if rows * out == 0 {
        return Ok(());
    }
    let a = [rows, inp, rank, out].map(|v| v as i32);
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: fused_smem_bytes(rank) as u32 };
    let mut l = be.stream().launch_builder(be.func("lowrank_forward")?);
    l.arg(y).arg(h).arg(x).arg(v).arg(u).arg(bias).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&a[3]);
    unsafe { l.launch(cfg) }.cu_with_context(|| format!("lowrank_forward launch (rows {rows}, in {inp}, rank {rank}, out {out})"))?;
    Ok(())
}

/// The two-GEMM path: `h = x Vᵀ` then `y = h Uᵀ + b` (also the benchmark baseline).
#[allow(clippy::too_many_arguments)]
pub fn unfused(be: &CudaBackend, y: &mut CudaSlice<f32>, h: &mut CudaSlice<f32>, x: &CudaSlice<f32>, v: &CudaSlice<f32>, u: &CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, inp: usize, rank: usize, out: usize) -> Result<()> {
    if inp == 0 {
        if rows * rank > 0 {
            be.stream().memset_zeros(&mut h.slice_mut(..rows * rank)).cu_context("lowrank with inp = 0: zeroing h")?;
        }
    } else {
        gemm(be, h, x, v, &RowMajorGemm::plain(rows, rank, inp, false, true, 0.0))?;
    }
    linear_forward(be, y, h, u, bias, rows, rank, out)
}
