//! Launchers of `kernels/embed.cu`: patch gathering, token assembly and
//! class-token pooling, forward and backward (grid-stride, one thread per
//! element).

use crate::backend::cuda::{CudaBackend, CudaBuf, DriverResultExt};
use anyhow::Result;
use cudarc::driver::PushKernelArg;

fn ints(values: &[usize]) -> Vec<i32> {
    values.iter().map(|&v| v as i32).collect()
}

pub fn patch_gather(be: &CudaBackend, patches: &mut CudaBuf, images: &CudaBuf, batch: usize, channels: usize, size: usize, patch: usize) -> Result<()> {
    let n = batch * channels * size * size;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, channels, size, patch]);
    let (pp, ip) = (be.act_mut(patches, "patch_gather patches")?, be.act(images, "patch_gather images")?);
    let mut l = be.stream().launch_builder(be.func("patch_gather")?);
    l.arg(&pp).arg(&ip).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&a[3]);
    unsafe { l.launch(be.grid_for(n)) }.cu_with_context(|| format!("patch_gather launch ({batch} images {channels}x{size}x{size}, patch {patch})"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn tokens_forward(be: &CudaBackend, x: &mut CudaBuf, patch_out: &CudaBuf, cls: &CudaBuf, pos: &CudaBuf, batch: usize, n_patches: usize, width: usize) -> Result<()> {
    let n = batch * (n_patches + 1) * width;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, n_patches, width]);
    let (xp, po) = (be.act_mut(x, "tokens x")?, be.act(patch_out, "tokens patch_out")?);
    let (cp, pp) = (be.f32(cls, "tokens cls")?, be.f32(pos, "tokens pos")?);
    let mut l = be.stream().launch_builder(be.func("tokens_forward")?);
    l.arg(&xp).arg(&po).arg(&cp).arg(&pp).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for(n)) }.cu_with_context(|| format!("tokens_forward launch [{batch}, {}, {width}]", n_patches + 1))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn tokens_backward(be: &CudaBackend, dpatch_out: &mut CudaBuf, dcls: &mut CudaBuf, dpos: &mut CudaBuf, dx: &CudaBuf, batch: usize, n_patches: usize, width: usize) -> Result<()> {
    if width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, n_patches, width]);
    let dxp = be.act(dx, "tokens dx")?;
    if batch * n_patches > 0 {
        let dp = be.act_mut(dpatch_out, "tokens dpatch_out")?;
        let mut l = be.stream().launch_builder(be.func("tokens_backward_patches")?);
        l.arg(&dp).arg(&dxp).arg(&a[0]).arg(&a[1]).arg(&a[2]);
        unsafe { l.launch(be.grid_for(batch * n_patches * width)) }.cu_with_context(|| format!("tokens_backward_patches launch [{batch}, {n_patches}, {width}]"))?;
    }
    let (dc, dp) = (be.f32_mut(dcls, "tokens dcls")?, be.f32_mut(dpos, "tokens dpos")?);
    let mut l = be.stream().launch_builder(be.func("tokens_backward_params")?);
    l.arg(&dc).arg(&dp).arg(&dxp).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for((n_patches + 1) * width)) }.cu_with_context(|| format!("tokens_backward_params launch [{batch}, {n_patches}, {width}]"))?;
    Ok(())
}

pub fn cls_gather(be: &CudaBackend, out: &mut CudaBuf, x: &CudaBuf, batch: usize, tokens: usize, width: usize) -> Result<()> {
    if batch * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, tokens, width]);
    let (o, xp) = (be.act_mut(out, "cls_gather out")?, be.act(x, "cls_gather x")?);
    let mut l = be.stream().launch_builder(be.func("cls_gather")?);
    l.arg(&o).arg(&xp).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for(batch * width)) }.cu_with_context(|| format!("cls_gather launch [{batch}, {tokens}, {width}]"))?;
    Ok(())
}

pub fn cls_scatter_add(be: &CudaBackend, dx: &mut CudaBuf, dout: &CudaBuf, batch: usize, tokens: usize, width: usize) -> Result<()> {
    if batch * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, tokens, width]);
    let (dxp, dop) = (be.act_mut(dx, "cls_scatter dx")?, be.act(dout, "cls_scatter dout")?);
    let mut l = be.stream().launch_builder(be.func("cls_scatter_add")?);
    l.arg(&dxp).arg(&dop).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for(batch * width)) }.cu_with_context(|| format!("cls_scatter_add launch [{batch}, {tokens}, {width}]"))?;
    Ok(())
}
