//! Launchers of `kernels/embed.cu`: patch gathering, token assembly, row
//! copies and pooling, forward and backward (grid-stride, one thread per
//! element, or per column where a thread sums).

use super::{EmbedKernel, Images, RowCopy, RowMean, Tokens};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::{Cuda, Precision};
use crate::ops::matmul::Accumulate;
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
    COPY_ROWS = "copy_rows",
    COPY_ROWS_PARAM = "copy_rows_param",
    SUM_ROWS_OVER_BATCH = "sum_rows_over_batch",
    MEAN_ROWS = "mean_rows",
    MEAN_ROWS_BACKWARD = "mean_rows_backward",
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
    fn copy_rows(
        &self,
        dst: &mut CudaBuf,
        src: &CudaBuf,
        shape: RowCopy,
        mode: Accumulate,
        _: Checked,
    ) -> Result<()> {
        copy_rows(self, dst, src, shape, mode)
    }
    fn sum_rows_over_batch(
        &self,
        dsrc: &mut CudaBuf,
        dx: &CudaBuf,
        shape: RowCopy,
        _: Checked,
    ) -> Result<()> {
        sum_rows_over_batch(self, dsrc, dx, shape)
    }
    fn mean_rows(
        &self,
        dst: &mut CudaBuf,
        src: &CudaBuf,
        shape: RowMean,
        _: Checked,
    ) -> Result<()> {
        mean_rows(self, MEAN_ROWS, dst, src, shape, shape.batch * shape.width)
    }
    fn mean_rows_backward(
        &self,
        dsrc: &mut CudaBuf,
        ddst: &CudaBuf,
        shape: RowMean,
        _: Checked,
    ) -> Result<()> {
        let n = shape.batch * shape.count * shape.width;
        mean_rows(self, MEAN_ROWS_BACKWARD, dsrc, ddst, shape, n)
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

/// `copy_rows(act_t* dst, const act_t* src, int batch, int width, int
/// src_tokens, int src_at, int dst_tokens, int dst_at, int rows, int
/// broadcast, int add)`, or `copy_rows_param` with `const float* src` when
/// `src` is an fp32 parameter and activations are bf16.
fn copy_rows(
    be: &Cuda,
    dst: &mut CudaBuf,
    src: &CudaBuf,
    shape: RowCopy,
    mode: Accumulate,
) -> Result<()> {
    let RowCopy {
        batch,
        width,
        src_tokens,
        src_at,
        dst_tokens,
        dst_at,
        rows,
        broadcast,
    } = shape;
    let n = batch * rows * width;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[
        batch,
        width,
        src_tokens,
        src_at,
        dst_tokens,
        dst_at,
        rows,
        broadcast as usize,
        mode.adds() as usize,
    ]);
    let (kernel, sp) = if src.is_bf16() || be.precision() == Precision::F32 {
        (COPY_ROWS, be.act(src, "copy_rows src")?)
    } else {
        (COPY_ROWS_PARAM, be.f32(src, "copy_rows src")?)
    };
    let dp = be.act_mut(dst, "copy_rows dst")?;
    let f = be.function(kernel, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dp).arg(&sp);
    for v in &a {
        l.arg(v);
    }
    unsafe { l.launch(be.elementwise_config(n)) }
        .cu_with_context(|| format!("copy_rows launch {shape:?} {mode:?}"))?;
    Ok(())
}

/// `sum_rows_over_batch(float* dsrc, const act_t* dx, int batch, int width,
/// int src_at, int dst_tokens, int dst_at, int rows)`.
fn sum_rows_over_batch(be: &Cuda, dsrc: &mut CudaBuf, dx: &CudaBuf, shape: RowCopy) -> Result<()> {
    let RowCopy {
        batch,
        width,
        src_at,
        dst_tokens,
        dst_at,
        rows,
        ..
    } = shape;
    if rows * width == 0 {
        return Ok(());
    }
    let a = ints(&[batch, width, src_at, dst_tokens, dst_at, rows]);
    let (dp, xp) = (
        be.f32_mut(dsrc, "sum_rows_over_batch dsrc")?,
        be.act(dx, "sum_rows_over_batch dx")?,
    );
    let f = be.function(SUM_ROWS_OVER_BATCH, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dp).arg(&xp);
    for v in &a {
        l.arg(v);
    }
    unsafe { l.launch(be.elementwise_config(rows * width)) }
        .cu_with_context(|| format!("sum_rows_over_batch launch {shape:?}"))?;
    Ok(())
}

/// `mean_rows(act_t* dst, const act_t* src, ...)` and
/// `mean_rows_backward(act_t* dsrc, const act_t* ddst, ...)`, both with
/// `(int batch, int width, int src_tokens, int src_at, int count, int
/// dst_tokens, int dst_at)`, over `n` threads.
fn mean_rows(
    be: &Cuda,
    kernel: crate::device::cuda::Kernel,
    out: &mut CudaBuf,
    input: &CudaBuf,
    shape: RowMean,
    n: usize,
) -> Result<()> {
    let RowMean {
        batch,
        width,
        src_tokens,
        src_at,
        count,
        dst_tokens,
        dst_at,
    } = shape;
    if n == 0 {
        return Ok(());
    }
    let a = ints(&[batch, width, src_tokens, src_at, count, dst_tokens, dst_at]);
    let (op, ip) = (
        be.act_mut(out, kernel.name())?,
        be.act(input, kernel.name())?,
    );
    let f = be.function(kernel, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&op).arg(&ip);
    for v in &a {
        l.arg(v);
    }
    unsafe { l.launch(be.elementwise_config(n)) }
        .cu_with_context(|| format!("{} launch {shape:?}", kernel.name()))?;
    Ok(())
}
