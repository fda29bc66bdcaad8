//! Launchers of `kernels/loss.cu`: one block of 256 threads per row, value
//! and gradient in one kernel; the batch loss is accumulated on the device
//! with atomicAdd into `loss[0]`.

use crate::backend::cuda::{CudaBackend, CudaBuf, DriverResultExt};
use crate::backend::LogitLossConfig;
use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

#[allow(clippy::too_many_arguments)]
pub fn logit_loss(be: &CudaBackend, ds: &mut CudaBuf, loss: &mut CudaBuf, s: &CudaBuf, teacher: Option<&CudaBuf>, labels: &[u32], batch: usize, classes: usize, cfg: &LogitLossConfig, scale: f32) -> Result<()> {
    if batch * classes == 0 {
        return Ok(());
    }
    let used_labels = if cfg.ce_weight != 0.0 { &labels[..batch] } else { &[][..] };
    let (b, c) = (batch as i32, classes as i32);
    let (dsp, lp, sp) = (be.act_mut(ds, "logit_loss ds")?, be.f32_mut(loss, "logit_loss loss")?, be.act(s, "logit_loss logits")?);
    let tp = match teacher {
        Some(t) => be.act(t, "logit_loss teacher logits")?,
        None => 0u64,
    };
    be.with_device_labels(used_labels, |dev_labels| {
        let mut l = be.stream().launch_builder(be.func("logit_loss")?);
        l.arg(&dsp).arg(&lp).arg(&sp).arg(&tp);
        l.arg(dev_labels).arg(&b).arg(&c);
        l.arg(&cfg.ce_weight).arg(&cfg.label_smoothing).arg(&cfg.kd_weight).arg(&cfg.temperature).arg(&cfg.feature_weight).arg(&scale);
        unsafe { l.launch(per_row(batch)) }.cu_with_context(|| format!("logit_loss launch [{batch}, {classes}]"))?;
        Ok(())
    })
}

#[allow(clippy::too_many_arguments)]
pub fn feature_loss(be: &CudaBackend, ds: &mut CudaBuf, loss: &mut CudaBuf, s: &CudaBuf, t: &CudaBuf, rows: usize, cols: usize, scale: f32) -> Result<()> {
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (dsp, lp) = (be.act_mut(ds, "feature_loss ds")?, be.f32_mut(loss, "feature_loss loss")?);
    let (sp, tp) = (be.act(s, "feature_loss s")?, be.act(t, "feature_loss t")?);
    let mut l = be.stream().launch_builder(be.func("feature_loss")?);
    l.arg(&dsp).arg(&lp).arg(&sp).arg(&tp).arg(&r).arg(&c).arg(&scale);
    unsafe { l.launch(per_row(rows)) }.cu_with_context(|| format!("feature_loss launch [{rows}, {cols}]"))?;
    Ok(())
}
