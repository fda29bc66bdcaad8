//! Launchers of the elementwise kernels (`kernels/elementwise.cu`): GELU
//! forward and backward, the residual `add_assign`, and the fp32 → bf16
//! conversion that refreshes a weight's bf16 copy.

use crate::backend::cuda::{CudaBackend, CudaBuf, DriverResultExt};
use anyhow::Result;
use cudarc::driver::PushKernelArg;

pub fn add_assign(be: &CudaBackend, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let (d, s) = (be.act_mut(dst, "add_assign dst")?, be.act(src, "add_assign src")?);
    let mut l = be.stream().launch_builder(be.func("add_assign")?);
    l.arg(&d).arg(&s).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("add_assign launch ({len} elements)"))?;
    Ok(())
}

pub fn gelu_forward(be: &CudaBackend, out: &mut CudaBuf, x: &CudaBuf, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let (o, xp) = (be.act_mut(out, "gelu out")?, be.act(x, "gelu x")?);
    let mut l = be.stream().launch_builder(be.func("gelu_forward")?);
    l.arg(&o).arg(&xp).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("gelu_forward launch ({len} elements)"))?;
    Ok(())
}

pub fn gelu_backward(be: &CudaBackend, dx: &mut CudaBuf, x: &CudaBuf, dout: &CudaBuf, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let (d, xp, dop) = (be.act_mut(dx, "gelu dx")?, be.act(x, "gelu x")?, be.act(dout, "gelu dout")?);
    let mut l = be.stream().launch_builder(be.func("gelu_backward")?);
    l.arg(&d).arg(&xp).arg(&dop).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("gelu_backward launch ({len} elements)"))?;
    Ok(())
}

/// `dst[i] = bf16(src[i])` for `i < len` (raw device addresses).
pub fn convert_f32_to_bf16(be: &CudaBackend, dst: u64, src: u64, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let mut l = be.stream().launch_builder(be.func("convert_f32_to_bf16")?);
    l.arg(&dst).arg(&src).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("convert_f32_to_bf16 launch ({len} elements)"))?;
    Ok(())
}
