//! Launchers of `kernels/layernorm.cu`: one warp per row for the forward
//! pass and the input gradient; column sums (block partials + atomicAdd)
//! for the parameter gradients.

use crate::backend::cuda::{CudaBackend, DriverResultExt};
use crate::ops::matmul::cuda::{column_sum_config, ROWS_PER_BLOCK};
use anyhow::Result;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// 8 warps per block, one row per warp.
fn row_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(be: &CudaBackend, out: &mut CudaSlice<f32>, mean: &mut CudaSlice<f32>, rstd: &mut CudaSlice<f32>, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, rows: usize, cols: usize, eps: f32) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let mut l = be.stream().launch_builder(be.func("layernorm_forward")?);
    l.arg(out).arg(mean).arg(rstd).arg(x).arg(gamma).arg(beta).arg(&r).arg(&c).arg(&eps);
    unsafe { l.launch(row_config(rows)) }.cu_with_context(|| format!("layernorm_forward launch [{rows}, {cols}]"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(be: &CudaBackend, dx: &mut CudaSlice<f32>, dgamma: &mut CudaSlice<f32>, dbeta: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, x: &CudaSlice<f32>, mean: &CudaSlice<f32>, rstd: &CudaSlice<f32>, gamma: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c, rpb) = (rows as i32, cols as i32, ROWS_PER_BLOCK as i32);
    let mut l = be.stream().launch_builder(be.func("layernorm_backward_dx")?);
    l.arg(dx).arg(dout).arg(x).arg(mean).arg(rstd).arg(gamma).arg(&r).arg(&c);
    unsafe { l.launch(row_config(rows)) }.cu_with_context(|| format!("layernorm_backward_dx launch [{rows}, {cols}]"))?;
    let mut l = be.stream().launch_builder(be.func("layernorm_backward_params")?);
    l.arg(dgamma).arg(dbeta).arg(dout).arg(x).arg(mean).arg(rstd).arg(&r).arg(&c).arg(&rpb);
    unsafe { l.launch(column_sum_config(rows, cols)) }.cu_with_context(|| format!("layernorm_backward_params launch [{rows}, {cols}]"))?;
    Ok(())
}
