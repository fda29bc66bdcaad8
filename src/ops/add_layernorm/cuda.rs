//! Launchers of `kernels/add_layernorm.cu`: one warp per row for the
//! forward pass and the input gradient; the parameter gradients are
//! LayerNorm's own column sums (`layernorm::cuda::backward_params`).

use super::{AddLayerNormKernel, Grads, Outputs, Terms};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::Cuda;
use crate::ops::layernorm::cuda::backward_params;
use crate::ops::layernorm::{Params, Saved};
use crate::ops::{Checked, Rows};
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "add_layernorm";
    ADD_LAYERNORM_FORWARD = "add_layernorm_forward",
    ADD_LAYERNORM_BACKWARD_DX = "add_layernorm_backward_dx",
}

impl AddLayerNormKernel for Cuda {
    fn add_layernorm_forward(
        &self,
        out: Outputs<'_, CudaBuf>,
        terms: Terms<'_, CudaBuf>,
        params: Params<'_, CudaBuf>,
        shape: Rows,
        eps: f32,
        _: Checked,
    ) -> Result<()> {
        forward(self, out, terms, params, shape, eps)
    }
    fn add_layernorm_backward(
        &self,
        grads: Grads<'_, CudaBuf>,
        dout: &CudaBuf,
        saved: Saved<'_, CudaBuf>,
        gamma: &CudaBuf,
        shape: Rows,
        ok: Checked,
    ) -> Result<()> {
        let Grads {
            dx,
            dbranch,
            dgamma,
            dbeta,
        } = grads;
        backward_dx(self, dx, dbranch, dout, saved, gamma, shape)?;
        backward_params(self, dgamma, dbeta, dout, saved, shape, ok)
    }
}

/// `add_layernorm_forward(act_t* s, act_t* y, float* mean, float* rstd,
/// const act_t* a, const act_t* b, const float* gamma, const float* beta,
/// int rows, int cols, float eps)`.
fn forward(
    be: &Cuda,
    out: Outputs<'_, CudaBuf>,
    terms: Terms<'_, CudaBuf>,
    params: Params<'_, CudaBuf>,
    shape: Rows,
    eps: f32,
) -> Result<()> {
    let Outputs {
        sum,
        out,
        mean,
        rstd,
    } = out;
    let (Terms { a, b }, Params { gamma, beta }) = (terms, params);
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (sp, op) = (
        be.act_mut(sum, "add_layernorm sum")?,
        be.act_mut(out, "add_layernorm out")?,
    );
    let (mu, rs) = (
        be.f32_mut(mean, "add_layernorm mean")?,
        be.f32_mut(rstd, "add_layernorm rstd")?,
    );
    let (ap, bp) = (be.act(a, "add_layernorm a")?, be.act(b, "add_layernorm b")?);
    let (g, bt) = (
        be.f32(gamma, "add_layernorm gamma")?,
        be.f32(beta, "add_layernorm beta")?,
    );
    let f = be.function(ADD_LAYERNORM_FORWARD, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&sp)
        .arg(&op)
        .arg(&mu)
        .arg(&rs)
        .arg(&ap)
        .arg(&bp)
        .arg(&g)
        .arg(&bt)
        .arg(&r)
        .arg(&c)
        .arg(&eps);
    unsafe { l.launch(Cuda::warp_per_row_config(rows)) }
        .cu_with_context(|| format!("add_layernorm_forward launch [{rows}, {cols}]"))?;
    Ok(())
}

/// `add_layernorm_backward_dx(act_t* dx, act_t* dbranch, const act_t* dy,
/// const act_t* s, const float* mean, const float* rstd, const float* gamma,
/// int rows, int cols)`: ADDS the input gradient to dx and copies it to dbranch.
fn backward_dx(
    be: &Cuda,
    dx: &mut CudaBuf,
    dbranch: &mut CudaBuf,
    dout: &CudaBuf,
    saved: Saved<'_, CudaBuf>,
    gamma: &CudaBuf,
    shape: Rows,
) -> Result<()> {
    let Saved { x: sum, mean, rstd } = saved;
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (dxp, dbp) = (
        be.act_mut(dx, "add_layernorm dx")?,
        be.act_mut(dbranch, "add_layernorm dbranch")?,
    );
    let (dop, sp) = (
        be.act(dout, "add_layernorm dout")?,
        be.act(sum, "add_layernorm sum")?,
    );
    let (mu, rs, g) = (
        be.f32(mean, "add_layernorm mean")?,
        be.f32(rstd, "add_layernorm rstd")?,
        be.f32(gamma, "add_layernorm gamma")?,
    );
    let f = be.function(ADD_LAYERNORM_BACKWARD_DX, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dxp)
        .arg(&dbp)
        .arg(&dop)
        .arg(&sp)
        .arg(&mu)
        .arg(&rs)
        .arg(&g)
        .arg(&r)
        .arg(&c);
    unsafe { l.launch(Cuda::warp_per_row_config(rows)) }
        .cu_with_context(|| format!("add_layernorm_backward_dx launch [{rows}, {cols}]"))?;
    Ok(())
}
