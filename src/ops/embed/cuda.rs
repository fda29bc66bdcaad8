//! Launchers of `kernels/embed.cu`: patch gathering, token assembly and
//! class-token pooling, forward and backward (grid-stride, one thread per
//! element).

use crate::backend::cuda::{CudaBackend, DriverResultExt};
use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};

fn ints(values: &[usize]) -> Vec<i32> {
    values.iter().map(|&v| v as i32).collect()
}

pub fn patch_gather(be: &CudaBackend, patches: &mut CudaSlice<f32>, images: &CudaSlice<f32>, batch: usize, channels: usize, size: usize, patch: usize) -> Result<()> {
    let n = batch * channels * size * size;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, channels, size, patch]);
    let mut l = be.stream().launch_builder(be.func("patch_gather")?);
    l.arg(patches).arg(images).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(&a[3]);
    unsafe { l.launch(be.grid_for(n)) }.cu_with_context(|| format!("patch_gather launch ({batch} images {channels}x{size}x{size}, patch {patch})"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn tokens_forward(be: &CudaBackend, x: &mut CudaSlice<f32>, patch_out: &CudaSlice<f32>, cls: &CudaSlice<f32>, pos: &CudaSlice<f32>, batch: usize, n_patches: usize, width: usize) -> Result<()> {
    let n = batch * (n_patches + 1) * width;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, n_patches, width]);
    let mut l = be.stream().launch_builder(be.func("tokens_forward")?);
    l.arg(x).arg(patch_out).arg(cls).arg(pos).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for(n)) }.cu_with_context(|| format!("tokens_forward launch [{batch}, {}, {width}]", n_patches + 1))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn tokens_backward(be: &CudaBackend, dpatch_out: &mut CudaSlice<f32>, dcls: &mut CudaSlice<f32>, dpos: &mut CudaSlice<f32>, dx: &CudaSlice<f32>, batch: usize, n_patches: usize, width: usize) -> Result<()> {
    if width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, n_patches, width]);
    if batch * n_patches > 0 {
        let mut l = be.stream().launch_builder(be.func("tokens_backward_patches")?);
        l.arg(dpatch_out).arg(dx).arg(&a[0]).arg(&a[1]).arg(&a[2]);
        unsafe { l.launch(be.grid_for(batch * n_patches * width)) }.cu_with_context(|| format!("tokens_backward_patches launch [{batch}, {n_patches}, {width}]"))?;
    }
    let mut l = be.stream().launch_builder(be.func("tokens_backward_params")?);
    l.arg(dcls).arg(dpos).arg(dx).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for((n_patches + 1) * width)) }.cu_with_context(|| format!("tokens_backward_params launch [{batch}, {n_patches}, {width}]"))?;
    Ok(())
}

pub fn cls_gather(be: &CudaBackend, out: &mut CudaSlice<f32>, x: &CudaSlice<f32>, batch: usize, tokens: usize, width: usize) -> Result<()> {
    if batch * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, tokens, width]);
    let mut l = be.stream().launch_builder(be.func("cls_gather")?);
    l.arg(out).arg(x).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for(batch * width)) }.cu_with_context(|| format!("cls_gather launch [{batch}, {tokens}, {width}]"))?;
    Ok(())
}

pub fn cls_scatter_add(be: &CudaBackend, dx: &mut CudaSlice<f32>, dout: &CudaSlice<f32>, batch: usize, tokens: usize, width: usize) -> Result<()> {
    if batch * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, tokens, width]);
    let mut l = be.stream().launch_builder(be.func("cls_scatter_add")?);
    l.arg(dx).arg(dout).arg(&a[0]).arg(&a[1]).arg(&a[2]);
    unsafe { l.launch(be.grid_for(batch * width)) }.cu_with_context(|| format!("cls_scatter_add launch [{batch}, {tokens}, {width}]"))?;
    Ok(())
}
