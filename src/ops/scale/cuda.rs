//! Launchers of `kernels/scale.cu`: the per-column scale (grid-stride, one
//! thread per element; the backward's dx is the same kernel over dy), dγ as
//! column sums, and the scalar scale.

use super::{Grads, ScaleKernel};
use crate::device::cuda::{CudaBuf, DriverResultExt, COLUMN_SUM_ROWS_PER_BLOCK};
use crate::device::Cuda;
use crate::ops::{Checked, Rows};
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "scale";
    SCALE_ROWS = "scale_rows",
    SCALE_BACKWARD_GAMMA = "scale_backward_gamma",
    SCALE_BY = "scale_by",
}

impl ScaleKernel for Cuda {
    fn scale_forward(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        gamma: &CudaBuf,
        shape: Rows,
        _: Checked,
    ) -> Result<()> {
        scale_rows(self, out, x, gamma, shape, "scale")
    }
    fn scale_backward(
        &self,
        Grads { dx, dgamma }: Grads<'_, CudaBuf>,
        dy: &CudaBuf,
        x: &CudaBuf,
        gamma: &CudaBuf,
        shape: Rows,
        _: Checked,
    ) -> Result<()> {
        scale_rows(self, dx, dy, gamma, shape, "scale backward")?;
        scale_backward_gamma(self, dgamma, dy, x, shape)
    }
    /// `scale_by(act_t* x, float alpha, u64 n)`.
    fn scale_by(&self, x: &mut CudaBuf, alpha: f32, len: usize, _: Checked) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let n = len as u64;
        let xp = self.act_mut(x, "scale by x")?;
        let f = self.function(SCALE_BY, 0)?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&xp).arg(&alpha).arg(&n);
        unsafe { l.launch(self.elementwise_config(len)) }
            .cu_with_context(|| format!("scale_by launch ({len} elements)"))?;
        Ok(())
    }
}

/// `scale_rows(act_t* y, const act_t* x, const float* gamma, int rows, int cols)`.
fn scale_rows(
    be: &Cuda,
    y: &mut CudaBuf,
    x: &CudaBuf,
    gamma: &CudaBuf,
    shape: Rows,
    what: &str,
) -> Result<()> {
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (yp, xp, gp) = (
        be.act_mut(y, what)?,
        be.act(x, what)?,
        be.f32(gamma, &format!("{what} gamma"))?,
    );
    let f = be.function(SCALE_ROWS, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&yp).arg(&xp).arg(&gp).arg(&r).arg(&c);
    unsafe { l.launch(be.elementwise_config(rows * cols)) }
        .cu_with_context(|| format!("scale_rows launch ({what}) [{rows}, {cols}]"))?;
    Ok(())
}

/// `scale_backward_gamma(float* dgamma, const act_t* dy, const act_t* x,
/// int rows, int cols, int rows_per_block)`: ADDS the column sums of dy ∘ x.
fn scale_backward_gamma(
    be: &Cuda,
    dgamma: &mut CudaBuf,
    dy: &CudaBuf,
    x: &CudaBuf,
    shape: Rows,
) -> Result<()> {
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c, rpb) = (rows as i32, cols as i32, COLUMN_SUM_ROWS_PER_BLOCK as i32);
    let (dg, dyp, xp) = (
        be.f32_mut(dgamma, "scale dgamma")?,
        be.act(dy, "scale dy")?,
        be.act(x, "scale x")?,
    );
    let f = be.function(SCALE_BACKWARD_GAMMA, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dg).arg(&dyp).arg(&xp).arg(&r).arg(&c).arg(&rpb);
    unsafe { l.launch(Cuda::column_sum_config(rows, cols)) }
        .cu_with_context(|| format!("scale_backward_gamma launch [{rows}, {cols}]"))?;
    Ok(())
}
