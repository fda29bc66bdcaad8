//! Launchers of `kernels/image.cu`: the raw bytes go to a reusable device
//! buffer, then one thread per output pixel resizes and normalizes
//! (`images_from_bytes`), or resamples the center crop of an intermediate
//! size (`images_from_bytes_cropped`, only for a transform with `resize`).

use super::{ImageKernel, ImageTransform};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::Cuda;
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "image";
    IMAGES_FROM_BYTES = "images_from_bytes",
    IMAGES_FROM_BYTES_CROPPED = "images_from_bytes_cropped",
}

impl ImageKernel for Cuda {
    fn images_from_bytes(
        &self,
        out: &mut CudaBuf,
        src: &[u8],
        batch: usize,
        t: &ImageTransform,
        _: Checked,
    ) -> Result<()> {
        match t.resize {
            None => images_from_bytes(self, out, src, batch, t),
            Some(_) => images_from_bytes_cropped(self, out, src, batch, t),
        }
    }
}

/// `images_from_bytes(act_t* out, const unsigned char* src, int batch, int
/// channels, int h, int w, int dst, float mean0..2, float inv_std0..2)`.
fn images_from_bytes(
    be: &Cuda,
    out: &mut CudaBuf,
    src: &[u8],
    batch: usize,
    t: &ImageTransform,
) -> Result<()> {
    let n = batch * t.channels * t.dst_size * t.dst_size;
    if n == 0 {
        return Ok(());
    }
    let dims = [batch, t.channels, t.src_height, t.src_width, t.dst_size].map(|v| v as i32);
    let inv = t.std.map(|s| 1.0 / s);
    let o = be.act_mut(out, "images_from_bytes out")?;
    be.with_device_bytes(src, |bytes| {
        let f = be.function(IMAGES_FROM_BYTES, 0)?;
        let mut l = be.stream().launch_builder(&f);
        l.arg(&o).arg(bytes);
        for d in &dims {
            l.arg(d);
        }
        for m in &t.mean {
            l.arg(m);
        }
        for i in &inv {
            l.arg(i);
        }
        unsafe { l.launch(be.elementwise_config(n)) }.cu_with_context(|| {
            format!(
                "images_from_bytes launch ({batch} images {}x{}x{} to {})",
                t.channels, t.src_height, t.src_width, t.dst_size
            )
        })?;
        Ok(())
    })
}

/// `images_from_bytes_cropped(act_t* out, const unsigned char* src, int
/// batch, int channels, int h, int w, int dst, int resized, int offset,
/// float mean0..2, float inv_std0..2)`.
fn images_from_bytes_cropped(
    be: &Cuda,
    out: &mut CudaBuf,
    src: &[u8],
    batch: usize,
    t: &ImageTransform,
) -> Result<()> {
    let n = batch * t.channels * t.dst_size * t.dst_size;
    if n == 0 {
        return Ok(());
    }
    let (resized, off) = t.resized();
    let dims = [
        batch,
        t.channels,
        t.src_height,
        t.src_width,
        t.dst_size,
        resized,
        off,
    ]
    .map(|v| v as i32);
    let inv = t.std.map(|s| 1.0 / s);
    let o = be.act_mut(out, "images_from_bytes_cropped out")?;
    be.with_device_bytes(src, |bytes| {
        let f = be.function(IMAGES_FROM_BYTES_CROPPED, 0)?;
        let mut l = be.stream().launch_builder(&f);
        l.arg(&o).arg(bytes);
        for d in &dims {
            l.arg(d);
        }
        for m in &t.mean {
            l.arg(m);
        }
        for i in &inv {
            l.arg(i);
        }
        unsafe { l.launch(be.elementwise_config(n)) }
            .cu_with_context(|| format!("images_from_bytes_cropped launch ({batch} images {}x{}x{} to {resized}, center {})", t.channels, t.src_height, t.src_width, t.dst_size))?;
        Ok(())
    })
}
