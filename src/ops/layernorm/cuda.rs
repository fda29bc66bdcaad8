//! Launchers of `kernels/layernorm.cu`: one warp per row for the forward
//! pass and the input gradient; column sums (block partials + atomicAdd)
//! for the parameter gradients.

use crate::backend::cuda::{CudaBackend, CudaBuf, DriverResultExt};
use crate::ops::matmul::cuda::{column_sum_config, ROWS_PER_BLOCK};
use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// 8 warps per block, one row per warp.
fn row_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(be: &CudaBackend, out: &mut CudaBuf, mean: &mut CudaBuf, rstd: &mut CudaBuf, x: &CudaBuf, gamma: &CudaBuf, beta: &CudaBuf, rows: usize, cols: usize, eps: f32) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (o, mu, rs) = (be.act_mut(out, "layernorm out")?, be.f32_mut(mean, "layernorm mean")?, be.f32_mut(rstd, "layernorm rstd")?);
    let (xp, g, b) = (be.act(x, "layernorm x")?, be.f32(gamma, "layernorm gamma")?, be.f32(beta, "layernorm beta")?);
    let mut l = be.stream().launch_builder(be.func("layernorm_forward")?);
    l.arg(&o).arg(&mu).arg(&rs).arg(&xp).arg(&g).arg(&b).arg(&r).arg(&c).arg(&eps);
    unsafe { l.launch(row_config(rows)) }.cu_with_context(|| format!("layernorm_forward launch [{rows}, {cols}]"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(be: &CudaBackend, dx: &mut CudaBuf, dgamma: &mut CudaBuf, dbeta: &mut CudaBuf, dout: &CudaBuf, x: &CudaBuf, mean: &CudaBuf, rstd: &CudaBuf, gamma: &CudaBuf, rows: usize, cols: usize) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c, rpb) = (rows as i32, cols as i32, ROWS_PER_BLOCK as i32);
    let (dxp, dop, xp) = (be.act_mut(dx, "layernorm dx")?, be.act(dout, "layernorm dout")?, be.act(x, "layernorm x")?);
    let (mu, rs, g) = (be.f32(mean, "layernorm mean")?, be.f32(rstd, "layernorm rstd")?, be.f32(gamma, "layernorm gamma")?);
    let (dg, db) = (be.f32_mut(dgamma, "layernorm dgamma")?, be.f32_mut(dbeta, "layernorm dbeta")?);
    let mut l = be.stream().launch_builder(be.func("layernorm_backward_dx")?);
    l.arg(&dxp).arg(&dop).arg(&xp).arg(&mu).arg(&rs).arg(&g).arg(&r).arg(&c);
    unsafe { l.launch(row_config(rows)) }.cu_with_context(|| format!("layernorm_backward_dx launch [{rows}, {cols}]"))?;
    let mut l = be.stream().launch_builder(be.func("layernorm_backward_params")?);
    l.arg(&dg).arg(&db).arg(&dop).arg(&xp).arg(&mu).arg(&rs).arg(&r).arg(&c).arg(&rpb);
    unsafe { l.launch(column_sum_config(rows, cols)) }.cu_with_context(|| format!("layernorm_backward_params launch [{rows}, {cols}]"))?;
    Ok(())
}
