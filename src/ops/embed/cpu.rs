//! Patch gathering, token assembly, row copies and pooling on the CPU.
//! The row ops sum in the order the CUDA kernels use (over the batch, or
//! over the pooled rows, from zero, then added or divided), so that at fp32
//! the two devices round alike and differ by far less than a reduction's
//! tolerance.

use super::{EmbedKernel, Images, RowCopy, RowMean, Tokens};
use crate::device::Cpu;
use crate::ops::matmul::Accumulate;
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

pub fn patch_gather(patches: &mut [f32], images: &[f32], shape: Images) {
    let Images {
        batch,
        channels,
        size,
        patch,
    } = shape;
    let grid = size / patch;
    let row_len = channels * patch * patch;
    patches[..batch * grid * grid * row_len]
        .par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(row, out)| {
            let (b, cell) = (row / (grid * grid), row % (grid * grid));
            let (py, px) = (cell / grid, cell % grid);
            for c in 0..channels {
                for y in 0..patch {
                    let src = ((b * channels + c) * size + py * patch + y) * size + px * patch;
                    let dst = (c * patch + y) * patch;
                    out[dst..dst + patch].copy_from_slice(&images[src..src + patch]);
                }
            }
        });
}

pub fn tokens_forward(x: &mut [f32], patch_out: &[f32], cls: &[f32], pos: &[f32], shape: Tokens) {
    let Tokens {
        batch,
        n_patches,
        width,
    } = shape;
    let t = n_patches + 1;
    x[..batch * t * width]
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, out)| {
            let (b, tok) = (row / t, row % t);
            let src = if tok == 0 {
                &cls[..width]
            } else {
                &patch_out[(b * n_patches + tok - 1) * width..][..width]
            };
            for ((o, s), p) in out
                .iter_mut()
                .zip(src)
                .zip(&pos[tok * width..(tok + 1) * width])
            {
                *o = s + p;
            }
        });
}

/// WRITES `dpatch_out`, ADDS to `dcls` and `dpos` (summed over the batch in
/// order, per token, so the result is deterministic).
pub fn tokens_backward(
    dpatch_out: &mut [f32],
    dcls: &mut [f32],
    dpos: &mut [f32],
    dx: &[f32],
    shape: Tokens,
) {
    let Tokens {
        batch,
        n_patches,
        width,
    } = shape;
    let t = n_patches + 1;
    dpatch_out[..batch * n_patches * width]
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, out)| {
            let (b, i) = (row / n_patches, row % n_patches);
            out.copy_from_slice(&dx[(b * t + 1 + i) * width..][..width]);
        });
    dpos[..t * width]
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(tok, dp)| {
            for b in 0..batch {
                for (d, g) in dp.iter_mut().zip(&dx[(b * t + tok) * width..][..width]) {
                    *d += g;
                }
            }
        });
    for b in 0..batch {
        for (d, g) in dcls[..width].iter_mut().zip(&dx[b * t * width..][..width]) {
            *d += g;
        }
    }
}

pub fn cls_gather(out: &mut [f32], x: &[f32], batch: usize, tokens: usize, width: usize) {
    for b in 0..batch {
        out[b * width..(b + 1) * width].copy_from_slice(&x[b * tokens * width..][..width]);
    }
}

pub fn cls_scatter_add(dx: &mut [f32], dout: &[f32], batch: usize, tokens: usize, width: usize) {
    for b in 0..batch {
        for (d, g) in dx[b * tokens * width..][..width]
            .iter_mut()
            .zip(&dout[b * width..(b + 1) * width])
        {
            *d += g;
        }
    }
}

pub fn copy_rows(dst: &mut [f32], src: &[f32], shape: RowCopy, mode: Accumulate) {
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
    if batch * rows == 0 {
        return;
    }
    let span = rows * width;
    dst[..batch * dst_tokens * width]
        .par_chunks_mut(dst_tokens * width)
        .enumerate()
        .for_each(|(b, image)| {
            let s = if broadcast { 0 } else { b };
            let from = &src[(s * src_tokens + src_at) * width..][..span];
            let to = &mut image[dst_at * width..][..span];
            match mode {
                Accumulate::Overwrite => to.copy_from_slice(from),
                Accumulate::Add => {
                    for (t, f) in to.iter_mut().zip(from) {
                        *t += f;
                    }
                }
            }
        });
}

/// ADDS to `dsrc` each row's sum over the batch, summed from zero in image order.
pub fn sum_rows_over_batch(dsrc: &mut [f32], dx: &[f32], shape: RowCopy) {
    let RowCopy {
        batch,
        width,
        src_at,
        dst_tokens,
        dst_at,
        rows,
        ..
    } = shape;
    dsrc[src_at * width..][..rows * width]
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(j, d)| {
            let mut sum = vec![0f32; width];
            for b in 0..batch {
                for (s, g) in sum
                    .iter_mut()
                    .zip(&dx[(b * dst_tokens + dst_at + j) * width..][..width])
                {
                    *s += g;
                }
            }
            for (d, s) in d.iter_mut().zip(sum) {
                *d += s;
            }
        });
}

/// Writes each image's mean row, summed from zero in row order, then divided.
pub fn mean_rows(dst: &mut [f32], src: &[f32], shape: RowMean) {
    let RowMean {
        batch,
        width,
        src_tokens,
        src_at,
        count,
        dst_tokens,
        dst_at,
    } = shape;
    let n = count as f32;
    dst[..batch * dst_tokens * width]
        .par_chunks_mut(dst_tokens * width)
        .enumerate()
        .for_each(|(b, image)| {
            let out = &mut image[dst_at * width..][..width];
            out.fill(0.0);
            for j in 0..count {
                for (o, v) in out
                    .iter_mut()
                    .zip(&src[(b * src_tokens + src_at + j) * width..][..width])
                {
                    *o += v;
                }
            }
            for o in out {
                *o /= n;
            }
        });
}

pub fn mean_rows_backward(dsrc: &mut [f32], ddst: &[f32], shape: RowMean) {
    let RowMean {
        batch,
        width,
        src_tokens,
        src_at,
        count,
        dst_tokens,
        dst_at,
    } = shape;
    let n = count as f32;
    dsrc[..batch * src_tokens * width]
        .par_chunks_mut(src_tokens * width)
        .enumerate()
        .for_each(|(b, image)| {
            let g = &ddst[(b * dst_tokens + dst_at) * width..][..width];
            for row in image[src_at * width..][..count * width].chunks_mut(width) {
                for (d, g) in row.iter_mut().zip(g) {
                    *d += g / n;
                }
            }
        });
}

impl EmbedKernel for Cpu {
    fn patch_gather(
        &self,
        patches: &mut Vec<f32>,
        images: &Vec<f32>,
        shape: Images,
        _: Checked,
    ) -> Result<()> {
        patch_gather(patches, images, shape);
        Ok(())
    }
    fn tokens_forward(
        &self,
        x: &mut Vec<f32>,
        patch_out: &Vec<f32>,
        cls: &Vec<f32>,
        pos: &Vec<f32>,
        shape: Tokens,
        _: Checked,
    ) -> Result<()> {
        tokens_forward(x, patch_out, cls, pos, shape);
        Ok(())
    }
    fn tokens_backward(
        &self,
        dpatch_out: &mut Vec<f32>,
        dcls: &mut Vec<f32>,
        dpos: &mut Vec<f32>,
        dx: &Vec<f32>,
        shape: Tokens,
        _: Checked,
    ) -> Result<()> {
        tokens_backward(dpatch_out, dcls, dpos, dx, shape);
        Ok(())
    }
    fn cls_gather(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        batch: usize,
        tokens: usize,
        width: usize,
        _: Checked,
    ) -> Result<()> {
        cls_gather(out, x, batch, tokens, width);
        Ok(())
    }
    fn cls_scatter_add(
        &self,
        dx: &mut Vec<f32>,
        dout: &Vec<f32>,
        batch: usize,
        tokens: usize,
        width: usize,
        _: Checked,
    ) -> Result<()> {
        cls_scatter_add(dx, dout, batch, tokens, width);
        Ok(())
    }
    fn copy_rows(
        &self,
        dst: &mut Vec<f32>,
        src: &Vec<f32>,
        shape: RowCopy,
        mode: Accumulate,
        _: Checked,
    ) -> Result<()> {
        copy_rows(dst, src, shape, mode);
        Ok(())
    }
    fn sum_rows_over_batch(
        &self,
        dsrc: &mut Vec<f32>,
        dx: &Vec<f32>,
        shape: RowCopy,
        _: Checked,
    ) -> Result<()> {
        sum_rows_over_batch(dsrc, dx, shape);
        Ok(())
    }
    fn mean_rows(
        &self,
        dst: &mut Vec<f32>,
        src: &Vec<f32>,
        shape: RowMean,
        _: Checked,
    ) -> Result<()> {
        mean_rows(dst, src, shape);
        Ok(())
    }
    fn mean_rows_backward(
        &self,
        dsrc: &mut Vec<f32>,
        ddst: &Vec<f32>,
        shape: RowMean,
        _: Checked,
    ) -> Result<()> {
        mean_rows_backward(dsrc, ddst, shape);
        Ok(())
    }
}
