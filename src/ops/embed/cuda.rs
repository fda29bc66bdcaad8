//! Launchers of `kernels/embed.cu`: patch gathering, token assembly and
//! class-token pooling, forward and backward (grid-stride, one thread per
//! element).

use super::{EmbedKernel, Images, Tokens};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::Cuda;
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "embed";
    PATCH_GATHER = "patch_gather",
    TOKENS_FORWARD = "tokens_forward",
    TOKENS_BACKWARD_PATCHES = "tokens_backward_patches",
    TOKENS_BACKWARD_PARAMS = "tokens_backward_params",
    CLS_GATHER = "cls_gather",
    CLS_SCATTER_ADD = "cls_scatter_add",
}

impl EmbedKernel for Cuda {
    fn patch_gather(
        &self,
        patches: &mut CudaBuf,
        images: &CudaBuf,
        shape: Images,
        _: Checked,
    ) -> Result<()> {
        patch_gather(self, patches, images, shape)
    }
    fn tokens_forward(
        &self,
        x: &mut CudaBuf,
        patch_out: &CudaBuf,
        cls: &CudaBuf,
        pos: &CudaBuf,
        shape: Tokens,
        _: Checked,
    ) -> Result<()> {
        tokens_forward(self, x, patch_out, cls, pos, shape)
    }
    fn tokens_backward(
        &self,
        dpatch_out: &mut CudaBuf,
        dcls: &mut CudaBuf,
        dpos: &mut CudaBuf,
        dx: &CudaBuf,
        shape: Tokens,
        _: Checked,
    ) -> Result<()> {
        tokens_backward(self, dpatch_out, dcls, dpos, dx, shape)
    }
    fn cls_gather(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        batch: usize,
        tokens: usize,
        width: usize,
        _: Checked,
    ) -> Result<()> {
        cls_gather(self, out, x, batch, tokens, width)
    }
    fn cls_scatter_add(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        batch: usize,
        tokens: usize,
        width: usize,
        _: Checked,
    ) -> Result<()> {
        cls_scatter_add(self, dx, dout, batch, tokens, width)
    }
}

fn ints(values: &[usize]) -> Vec<i32> {
    values.iter().map(|&v| v as i32).collect()
}

/// `patch_gather(act_t* patches, const act_t* images, int batch, int channels, int size, int patch)`.
fn patch_gather(be: &Cuda, patches: &mut CudaBuf, images: &CudaBuf, shape: Images) -> Result<()> {
    let Images {
        batch,
        channels,
        size,
        patch,
    } = shape;
    let n = batch * channels * size * size;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, channels, size, patch]);
    let (pp, ip) = (
        be.act_mut(patches, "patch_gather patches")?,
        be.act(images, "patch_gather images")?,
    );
    let f = be.function(PATCH_GATHER, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&pp)
        .arg(&ip)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2])
        .arg(&a[3]);
    unsafe { l.launch(be.elementwise_config(n)) }.cu_with_context(|| {
        format!("patch_gather launch ({batch} images {channels}x{size}x{size}, patch {patch})")
    })?;
    Ok(())
}

/// `tokens_forward(act_t* x, const act_t* patch_out, const float* cls, const float* pos, int batch, int n_patches, int width)`.
fn tokens_forward(
    be: &Cuda,
    x: &mut CudaBuf,
    patch_out: &CudaBuf,
    cls: &CudaBuf,
    pos: &CudaBuf,
    shape: Tokens,
) -> Result<()> {
    let Tokens {
        batch,
        n_patches,
        width,
    } = shape;
    let n = batch * (n_patches + 1) * width;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, n_patches, width]);
    let (xp, po) = (
        be.act_mut(x, "tokens x")?,
        be.act(patch_out, "tokens patch_out")?,
    );
    let (cp, pp) = (be.f32(cls, "tokens cls")?, be.f32(pos, "tokens pos")?);
    let f = be.function(TOKENS_FORWARD, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&xp)
        .arg(&po)
        .arg(&cp)
        .arg(&pp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(be.elementwise_config(n)) }.cu_with_context(|| {
        format!(
            "tokens_forward launch [{batch}, {}, {width}]",
            n_patches + 1
        )
    })?;
    Ok(())
}

/// `tokens_backward_patches(act_t* dpatch_out, const act_t* dx, int batch, int n_patches, int width)`,
/// then `tokens_backward_params(float* dcls, float* dpos, const act_t* dx, int batch, int n_patches, int width)`.
fn tokens_backward(
    be: &Cuda,
    dpatch_out: &mut CudaBuf,
    dcls: &mut CudaBuf,
    dpos: &mut CudaBuf,
    dx: &CudaBuf,
    shape: Tokens,
) -> Result<()> {
    let Tokens {
        batch,
        n_patches,
        width,
    } = shape;
    if width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, n_patches, width]);
    let dxp = be.act(dx, "tokens dx")?;
    if batch * n_patches > 0 {
        let dp = be.act_mut(dpatch_out, "tokens dpatch_out")?;
        let f = be.function(TOKENS_BACKWARD_PATCHES, 0)?;
        let mut l = be.stream().launch_builder(&f);
        l.arg(&dp).arg(&dxp).arg(&a[0]).arg(&a[1]).arg(&a[2]);
        unsafe { l.launch(be.elementwise_config(batch * n_patches * width)) }.cu_with_context(
            || format!("tokens_backward_patches launch [{batch}, {n_patches}, {width}]"),
        )?;
    }
    let (dc, dp) = (
        be.f32_mut(dcls, "tokens dcls")?,
        be.f32_mut(dpos, "tokens dpos")?,
    );
    let f = be.function(TOKENS_BACKWARD_PARAMS, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dc)
        .arg(&dp)
        .arg(&dxp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(be.elementwise_config((n_patches + 1) * width)) }.cu_with_context(|| {
        format!("tokens_backward_params launch [{batch}, {n_patches}, {width}]")
    })?;
    Ok(())
}

/// `cls_gather(act_t* out, const act_t* x, int batch, int tokens, int width)`.
fn cls_gather(
    be: &Cuda,
    out: &mut CudaBuf,
    x: &CudaBuf,
    batch: usize,
    tokens: usize,
    width: usize,
) -> Result<()> {
    if batch * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, tokens, width]);
    let (o, xp) = (
        be.act_mut(out, "cls_gather out")?,
        be.act(x, "cls_gather x")?,
    );
    let f = be.function(CLS_GATHER, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&o).arg(&xp).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.elementwise_config(batch * width)) }
        .cu_with_context(|| format!("cls_gather launch [{batch}, {tokens}, {width}]"))?;
    Ok(())
}

/// `cls_scatter_add(act_t* dx, const act_t* dout, int batch, int tokens, int width)`.
fn cls_scatter_add(
    be: &Cuda,
    dx: &mut CudaBuf,
    dout: &CudaBuf,
    batch: usize,
    tokens: usize,
    width: usize,
) -> Result<()> {
    if batch * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, tokens, width]);
    let (dxp, dop) = (
        be.act_mut(dx, "cls_scatter dx")?,
        be.act(dout, "cls_scatter dout")?,
    );
    let f = be.function(CLS_SCATTER_ADD, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dxp).arg(&dop).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.elementwise_config(batch * width)) }
        .cu_with_context(|| format!("cls_scatter_add launch [{batch}, {tokens}, {width}]"))?;
    Ok(())
}
