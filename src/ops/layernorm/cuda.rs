//! Launchers of `kernels/layernorm.cu`: one warp per row for the forward
//! pass and the input gradient; column sums (block partials + atomicAdd)
//! for the parameter gradients.

use super::{Grads, LayerNormKernel, Outputs, Params, Saved};
use crate::device::cuda::{CudaBuf, DriverResultExt, COLUMN_SUM_ROWS_PER_BLOCK};
use crate::device::Cuda;
use crate::ops::{Checked, Rows};
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "layernorm";
    LAYERNORM_FORWARD = "layernorm_forward",
    LAYERNORM_BACKWARD_DX = "layernorm_backward_dx",
    LAYERNORM_BACKWARD_PARAMS = "layernorm_backward_params",
}

impl LayerNormKernel for Cuda {
    fn layernorm_forward(
        &self,
        out: Outputs<'_, CudaBuf>,
        x: &CudaBuf,
        params: Params<'_, CudaBuf>,
        shape: Rows,
        eps: f32,
        _: Checked,
    ) -> Result<()> {
        forward(self, out, x, params, shape, eps)
    }
    fn layernorm_backward(
        &self,
        grads: Grads<'_, CudaBuf>,
        dout: &CudaBuf,
        saved: Saved<'_, CudaBuf>,
        gamma: &CudaBuf,
        shape: Rows,
        ok: Checked,
    ) -> Result<()> {
        backward_dx(self, grads.dx, dout, saved, gamma, shape, ok)?;
        backward_params(self, grads.dgamma, grads.dbeta, dout, saved, shape, ok)
    }
}

/// `layernorm_forward(act_t* out, float* mean, float* rstd, const act_t* x,
/// const float* gamma, const float* beta, int rows, int cols, float eps)`.
fn forward(
    be: &Cuda,
    out: Outputs<'_, CudaBuf>,
    x: &CudaBuf,
    params: Params<'_, CudaBuf>,
    shape: Rows,
    eps: f32,
) -> Result<()> {
    let (Outputs { out, mean, rstd }, Params { gamma, beta }) = (out, params);
    let Rows { rows, cols } = shape;
    if rows == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (o, mu, rs) = (
        be.act_mut(out, "layernorm out")?,
        be.f32_mut(mean, "layernorm mean")?,
        be.f32_mut(rstd, "layernorm rstd")?,
    );
    let (xp, g, b) = (
        be.act(x, "layernorm x")?,
        be.f32(gamma, "layernorm gamma")?,
        be.f32(beta, "layernorm beta")?,
    );
    let f = be.function(LAYERNORM_FORWARD, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&o)
        .arg(&mu)
        .arg(&rs)
        .arg(&xp)
        .arg(&g)
        .arg(&b)
        .arg(&r)
        .arg(&c)
        .arg(&eps);
    unsafe { l.launch(Cuda::warp_per_row_config(rows)) }
        .cu_with_context(|| format!("layernorm_forward launch [{rows}, {cols}]"))?;
    Ok(())
}

/// `layernorm_backward_dx(act_t* dx, const act_t* dout, const act_t* x,
/// const float* mean, const float* rstd, const float* gamma, int rows, int
/// cols)`: ADDS the input gradient, one warp per row.
pub fn backward_dx(
    be: &Cuda,
    dx: &mut CudaBuf,
    dout: &CudaBuf,
    saved: Saved<'_, CudaBuf>,
    gamma: &CudaBuf,
    shape: Rows,
    _: Checked,
) -> Result<()> {
    let Saved { x, mean, rstd } = saved;
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (dxp, dop, xp) = (
        be.act_mut(dx, "layernorm dx")?,
        be.act(dout, "layernorm dout")?,
        be.act(x, "layernorm x")?,
    );
    let (mu, rs, g) = (
        be.f32(mean, "layernorm mean")?,
        be.f32(rstd, "layernorm rstd")?,
        be.f32(gamma, "layernorm gamma")?,
    );
    let f = be.function(LAYERNORM_BACKWARD_DX, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dxp)
        .arg(&dop)
        .arg(&xp)
        .arg(&mu)
        .arg(&rs)
        .arg(&g)
        .arg(&r)
        .arg(&c);
    unsafe { l.launch(Cuda::warp_per_row_config(rows)) }
        .cu_with_context(|| format!("layernorm_backward_dx launch [{rows}, {cols}]"))?;
    Ok(())
}

/// `layernorm_backward_params(float* dgamma, float* dbeta, const act_t*
/// dout, const act_t* x, const float* mean, const float* rstd, int rows, int
/// cols, int rows_per_block)`: ADDS the parameter gradients (column sums).
pub fn backward_params(
    be: &Cuda,
    dgamma: &mut CudaBuf,
    dbeta: &mut CudaBuf,
    dout: &CudaBuf,
    saved: Saved<'_, CudaBuf>,
    shape: Rows,
    _: Checked,
) -> Result<()> {
    let Saved { x, mean, rstd } = saved;
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c, rpb) = (rows as i32, cols as i32, COLUMN_SUM_ROWS_PER_BLOCK as i32);
    let (dop, xp, mu, rs) = (
        be.act(dout, "layernorm dout")?,
        be.act(x, "layernorm x")?,
        be.f32(mean, "layernorm mean")?,
        be.f32(rstd, "layernorm rstd")?,
    );
    let (dg, db) = (
        be.f32_mut(dgamma, "layernorm dgamma")?,
        be.f32_mut(dbeta, "layernorm dbeta")?,
    );
    let f = be.function(LAYERNORM_BACKWARD_PARAMS, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dg)
        .arg(&db)
        .arg(&dop)
        .arg(&xp)
        .arg(&mu)
        .arg(&rs)
        .arg(&r)
        .arg(&c)
        .arg(&rpb);
    unsafe { l.launch(Cuda::column_sum_config(rows, cols)) }
        .cu_with_context(|| format!("layernorm_backward_params launch [{rows}, {cols}]"))?;
    Ok(())
}
