//! Launchers of `kernels/loss.cu`: one block of 256 threads per row, value
//! and gradient in one kernel; the batch loss is accumulated on the device
//! with atomicAdd into `loss[0]`.

use super::{LogitLossConfig, Logits, LossKernel, Outputs};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::Cuda;
use crate::ops::{Checked, Rows};
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "loss";
    LOGIT_LOSS = "logit_loss",
    FEATURE_LOSS = "feature_loss",
}

impl LossKernel for Cuda {
    fn logit_loss(
        &self,
        out: Outputs<'_, CudaBuf>,
        logits: Logits<'_, CudaBuf>,
        shape: Rows,
        cfg: &LogitLossConfig,
        scale: f32,
        _: Checked,
    ) -> Result<()> {
        logit_loss(self, out, logits, shape, cfg, scale)
    }
    fn feature_loss(
        &self,
        out: Outputs<'_, CudaBuf>,
        s: &CudaBuf,
        t: &CudaBuf,
        shape: Rows,
        scale: f32,
        _: Checked,
    ) -> Result<()> {
        feature_loss(self, out, s, t, shape, scale)
    }
}

/// `logit_loss(act_t* ds, float* loss, const act_t* s, const act_t* t (or
/// null), const unsigned* labels, int batch, int classes, float ce_weight,
/// float label_smoothing, float kd_weight, float temperature, float
/// feature_weight, float scale)`.
fn logit_loss(
    be: &Cuda,
    out: Outputs<'_, CudaBuf>,
    logits: Logits<'_, CudaBuf>,
    shape: Rows,
    cfg: &LogitLossConfig,
    scale: f32,
) -> Result<()> {
    let Outputs { ds, loss } = out;
    let Logits {
        student: s,
        teacher,
        labels,
    } = logits;
    let Rows {
        rows: batch,
        cols: classes,
    } = shape;
    if batch * classes == 0 {
        return Ok(());
    }
    let used_labels = if cfg.ce_weight != 0.0 {
        &labels[..batch]
    } else {
        &[][..]
    };
    let (b, c) = (batch as i32, classes as i32);
    let (dsp, lp, sp) = (
        be.act_mut(ds, "logit_loss ds")?,
        be.f32_mut(loss, "logit_loss loss")?,
        be.act(s, "logit_loss logits")?,
    );
    let tp = match teacher {
        Some(t) => be.act(t, "logit_loss teacher logits")?,
        None => 0u64,
    };
    be.with_device_labels(used_labels, |dev_labels| {
        let f = be.function(LOGIT_LOSS, 0)?;
        let mut l = be.stream().launch_builder(&f);
        l.arg(&dsp).arg(&lp).arg(&sp).arg(&tp);
        l.arg(dev_labels).arg(&b).arg(&c);
        l.arg(&cfg.ce_weight)
            .arg(&cfg.label_smoothing)
            .arg(&cfg.kd_weight)
            .arg(&cfg.temperature)
            .arg(&cfg.feature_weight)
            .arg(&scale);
        unsafe { l.launch(Cuda::block_per_row_config(batch)) }
            .cu_with_context(|| format!("logit_loss launch [{batch}, {classes}]"))?;
        Ok(())
    })
}

/// `feature_loss(act_t* ds, float* loss, const act_t* s, const act_t* t,
/// int rows, int cols, float scale)`.
fn feature_loss(
    be: &Cuda,
    out: Outputs<'_, CudaBuf>,
    s: &CudaBuf,
    t: &CudaBuf,
    shape: Rows,
    scale: f32,
) -> Result<()> {
    let Outputs { ds, loss } = out;
    let Rows { rows, cols } = shape;
    if rows * cols == 0 {
        return Ok(());
    }
    let (r, c) = (rows as i32, cols as i32);
    let (dsp, lp) = (
        be.act_mut(ds, "feature_loss ds")?,
        be.f32_mut(loss, "feature_loss loss")?,
    );
    let (sp, tp) = (be.act(s, "feature_loss s")?, be.act(t, "feature_loss t")?);
    let f = be.function(FEATURE_LOSS, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dsp)
        .arg(&lp)
        .arg(&sp)
        .arg(&tp)
        .arg(&r)
        .arg(&c)
        .arg(&scale);
    unsafe { l.launch(Cuda::block_per_row_config(rows)) }
        .cu_with_context(|| format!("feature_loss launch [{rows}, {cols}]"))?;
    Ok(())
}
