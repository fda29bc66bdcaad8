//! Launchers of `kernels/adamw.cu`: the global gradient norm (fp64 block
//! sums, one atomicAdd per block) and the fused AdamW step, which reads the
//! squared norm on the device so the clip needs no host synchronization.

use super::{AdamWKernel, AdamWStep, State};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::Cuda;
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "adamw";
    SUM_SQUARES = "sum_squares",
    ADAMW_UPDATE = "adamw_update",
}

impl AdamWKernel for Cuda {
    fn sum_squares(&self, acc: &mut CudaBuf, x: &CudaBuf, len: usize, _: Checked) -> Result<()> {
        sum_squares(self, acc, x, len)
    }
    fn adamw_update(
        &self,
        state: State<'_, CudaBuf>,
        grad: &CudaBuf,
        grad_norm_sq: &CudaBuf,
        len: usize,
        hp: &AdamWStep,
        _: Checked,
    ) -> Result<()> {
        adamw_update(self, state, grad, grad_norm_sq, len, hp)
    }
}

/// `sum_squares(float* acc, const float* x, u64 n)`.
fn sum_squares(be: &Cuda, acc: &mut CudaBuf, x: &CudaBuf, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let (a, xp) = (
        be.f32_mut(acc, "sum_squares acc")?,
        be.f32(x, "sum_squares x")?,
    );
    let f = be.function(SUM_SQUARES, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&a).arg(&xp).arg(&n);
    unsafe { l.launch(be.elementwise_config(len)) }
        .cu_with_context(|| format!("sum_squares launch ({len} elements)"))?;
    Ok(())
}

/// `adamw_update(float* param, const float* grad, float* m, float* v, const
/// float* grad_norm_sq, u64 n, float lr, float beta1, float beta2, float eps,
/// float weight_decay, float bc1, float bc2, int clip, float max_norm, bf16* shadow)`.
fn adamw_update(
    be: &Cuda,
    state: State<'_, CudaBuf>,
    grad: &CudaBuf,
    grad_norm_sq: &CudaBuf,
    len: usize,
    hp: &AdamWStep,
) -> Result<()> {
    let State { param, m, v } = state;
    if len == 0 {
        return Ok(());
    }
    // Bias corrections as the CPU reference computes them (f64 powers, then f32).
    let bc1 = (1.0 - (hp.beta1 as f64).powi(hp.step as i32)) as f32;
    let bc2 = (1.0 - (hp.beta2 as f64).powi(hp.step as i32)) as f32;
    let n = len as u64;
    let clip = i32::from(hp.max_grad_norm.is_some());
    let max_norm = hp.max_grad_norm.unwrap_or(0.0);
    let p = be.f32_mut(param, "adamw param")?;
    // The weight's bf16 copy (if it has one) is rewritten by the same kernel.
    let copy = if len == param.len() {
        be.bf16_copy_for_update(param)
    } else {
        0
    };
    let (g, mp, vp, gn) = (
        be.f32(grad, "adamw grad")?,
        be.f32_mut(m, "adamw m")?,
        be.f32_mut(v, "adamw v")?,
        be.f32(grad_norm_sq, "adamw grad_norm_sq")?,
    );
    let f = be.function(ADAMW_UPDATE, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&p).arg(&g).arg(&mp).arg(&vp).arg(&gn).arg(&n);
    l.arg(&hp.lr)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&hp.eps)
        .arg(&hp.weight_decay)
        .arg(&bc1)
        .arg(&bc2)
        .arg(&clip)
        .arg(&max_norm)
        .arg(&copy);
    unsafe { l.launch(be.elementwise_config(len)) }
        .cu_with_context(|| format!("adamw_update launch ({len} elements)"))?;
    Ok(())
}
