//! Launchers of the elementwise kernels (`kernels/elementwise.cu`): GELU
//! forward and backward, and the residual `add_assign`.

use crate::backend::cuda::{CudaBackend, DriverResultExt};
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

pub fn add_assign(be: &CudaBackend, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let mut l = be.stream().launch_builder(be.func("add_assign")?);
    l.arg(dst).arg(src).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("add_assign launch ({len} elements)"))?;
    Ok(())
}

pub fn gelu_forward(be: &CudaBackend, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let mut l = be.stream().launch_builder(be.func("gelu_forward")?);
    l.arg(out).arg(x).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("gelu_forward launch ({len} elements)"))?;
    Ok(())
}

pub fn gelu_backward(be: &CudaBackend, dx: &mut CudaSlice<f32>, x: &CudaSlice<f32>, dout: &CudaSlice<f32>, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let mut l = be.stream().launch_builder(be.func("gelu_backward")?);
    l.arg(dx).arg(x).arg(dout).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("gelu_backward launch ({len} elements)"))?;
    Ok(())
}
