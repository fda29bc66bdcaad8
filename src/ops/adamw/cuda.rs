//! Launchers of `kernels/adamw.cu`: the global gradient norm (fp64 block
//! sums, one atomicAdd per block) and the fused AdamW step, which reads the
//! squared norm on the device so the clip needs no host synchronization.

use crate::backend::cuda::{CudaBackend, DriverResultExt};
use crate::backend::AdamWStep;
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

pub fn sum_squares(be: &CudaBackend, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let mut l = be.stream().launch_builder(be.func("sum_squares")?);
    l.arg(acc).arg(x).arg(&n);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("sum_squares launch ({len} elements)"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn adamw_update(be: &CudaBackend, param: &mut CudaSlice<f32>, grad: &CudaSlice<f32>, m: &mut CudaSlice<f32>, v: &mut CudaSlice<f32>, grad_norm_sq: &CudaSlice<f32>, len: usize, hp: &AdamWStep) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    // Bias corrections as the CPU reference computes them (f64 powers, then f32).
    let bc1 = (1.0 - (hp.beta1 as f64).powi(hp.step as i32)) as f32;
    let bc2 = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)) as f32;
    let n = len as u64;
    let clip = i32::from(hp.max_grad_norm.is_some());
    let max_norm = hp.max_grad_norm.unwrap_or(0.0);
    let mut l = be.stream().launch_builder(be.func("adamw_update")?);
    l.arg(param).arg(grad).arg(m).arg(v).arg(grad_norm_sq).arg(&n);
    l.arg(&hp.lr).arg(&hp.beta1).arg(&hp.beta2).arg(&hp.eps).arg(&hp.weight_decay).arg(&bc1).arg(&bc2).arg(&clip).arg(&max_norm);
    unsafe { l.launch(be.grid_for(len)) }.cu_with_context(|| format!("adamw_update launch ({len} elements)"))?;
    Ok(())
}
