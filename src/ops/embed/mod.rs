//! Patch embedding input, token assembly and pooling:
//!
//! ```text
//! patch_gather   patches[b·P + p, (c, y, x)] = image[b, c, py·s + y, px·s + x]
//! tokens         x[b, 0] = cls + pos[0],  x[b, 1+i] = patch_out[b, i] + pos[1+i]
//!   backward     dpatch_out[b, i] = dx[b, 1+i],  dcls += Σ_b dx[b, 0],  dpos += Σ_b dx[b]
//! cls pooling    out[b] = x[b, 0];  backward dx[b, 0] += dout[b]
//!
//! copy_rows            dst[b, dst_at + j] (+)= src[s, src_at + j],  j < rows,
//!                      s = b, or s = 0 when `broadcast` (src one image: a parameter)
//! sum_rows_over_batch  dsrc[0, src_at + j] += Σ_b dx[b, dst_at + j]   (backward of a broadcast copy)
//! mean_rows            dst[b, dst_at] = (1/count) · Σ_{j<count} src[b, src_at + j]
//!   backward           dsrc[b, src_at + j] += ddst[b, dst_at] / count
//! ```
//! The patch embedding itself is a dense linear layer over the gathered
//! patches with the convolution weight `[D, C, s, s]` read as `[D, C·s·s]`.
//!
//! `tokens_forward` and `cls_gather` are the plain ViT's layout (one class
//! token). The row ops build any other from pieces: prefix tokens (class,
//! distillation, registers) and position embeddings are broadcast copies of
//! parameters, patch embeddings a copy at an offset, pooling a copy (class
//! or distillation token) or a mean (average pooling); the backward of a
//! non-broadcast copy is the copy with `src` and `dst` swapped, added.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::matmul::Accumulate;
use super::{need, product, profiled, work, Checked};
use crate::device::Device;
use anyhow::{bail, Result};

/// A batch of square images cut into square patches: `batch` images of
/// `channels × size × size`, patches of `patch × patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Images {
    pub batch: usize,
    pub channels: usize,
    pub size: usize,
    pub patch: usize,
}

/// The token sequences of a batch: per image a class token and
/// `n_patches` patch tokens, each `width` wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub batch: usize,
    pub n_patches: usize,
    pub width: usize,
}

/// `rows` consecutive token rows copied between token sequences, in every
/// image: `dst` is `[batch, dst_tokens, width]`, `src` is `[batch,
/// src_tokens, width]`, or `[1, src_tokens, width]` when `broadcast` (a
/// parameter, copied into every image). Rows `src_at..src_at + rows` of
/// `src` go to rows `dst_at..dst_at + rows` of `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowCopy {
    pub batch: usize,
    pub width: usize,
    pub src_tokens: usize,
    pub src_at: usize,
    pub dst_tokens: usize,
    pub dst_at: usize,
    pub rows: usize,
    pub broadcast: bool,
}

impl RowCopy {
    /// Checks the shape (`what` names the op) and returns how many elements
    /// `(dst, src)` hold.
    fn lens(self, what: &str) -> Result<(usize, usize)> {
        positive(what, "width", self.width)?;
        within(what, "src", self.src_at, self.rows, self.src_tokens)?;
        within(what, "dst", self.dst_at, self.rows, self.dst_tokens)?;
        let src_images = if self.broadcast { 1 } else { self.batch };
        Ok((
            product(what, &[self.batch, self.dst_tokens, self.width])?,
            product(what, &[src_images, self.src_tokens, self.width])?,
        ))
    }
}

/// The mean of `count` consecutive token rows per image into one row:
/// rows `src_at..src_at + count` of `src[batch, src_tokens, width]` into
/// row `dst_at` of `dst[batch, dst_tokens, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowMean {
    pub batch: usize,
    pub width: usize,
    pub src_tokens: usize,
    pub src_at: usize,
    pub count: usize,
    pub dst_tokens: usize,
    pub dst_at: usize,
}

impl RowMean {
    /// Checks the shape (`what` names the op) and returns how many elements
    /// `(dst, src)` hold.
    fn lens(self, what: &str) -> Result<(usize, usize)> {
        positive(what, "width", self.width)?;
        positive(what, "count", self.count)?;
        within(what, "src", self.src_at, self.count, self.src_tokens)?;
        within(what, "dst", self.dst_at, 1, self.dst_tokens)?;
        Ok((
            product(what, &[self.batch, self.dst_tokens, self.width])?,
            product(what, &[self.batch, self.src_tokens, self.width])?,
        ))
    }
}

/// The error of rows `at..at + count` that run past a sequence of `tokens`.
fn within(what: &str, name: &str, at: usize, count: usize, tokens: usize) -> Result<()> {
    match at.checked_add(count) {
        Some(end) if end <= tokens => Ok(()),
        _ => bail!("{what}: {count} {name} rows from row {at} run past its {tokens} tokens"),
    }
}

/// Device bodies of the embedding and pooling ops (call the functions below).
pub trait EmbedKernel: Device {
    fn patch_gather(
        &self,
        patches: &mut Self::Buf,
        images: &Self::Buf,
        shape: Images,
        _: Checked,
    ) -> Result<()>;
    fn tokens_forward(
        &self,
        x: &mut Self::Buf,
        patch_out: &Self::Buf,
        cls: &Self::Buf,
        pos: &Self::Buf,
        shape: Tokens,
        _: Checked,
    ) -> Result<()>;
    fn tokens_backward(
        &self,
        dpatch_out: &mut Self::Buf,
        dcls: &mut Self::Buf,
        dpos: &mut Self::Buf,
        dx: &Self::Buf,
        shape: Tokens,
        _: Checked,
    ) -> Result<()>;
    fn cls_gather(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        batch: usize,
        tokens: usize,
        width: usize,
        _: Checked,
    ) -> Result<()>;
    fn cls_scatter_add(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        batch: usize,
        tokens: usize,
        width: usize,
        _: Checked,
    ) -> Result<()>;
    fn copy_rows(
        &self,
        dst: &mut Self::Buf,
        src: &Self::Buf,
        shape: RowCopy,
        mode: Accumulate,
        _: Checked,
    ) -> Result<()>;
    fn sum_rows_over_batch(
        &self,
        dsrc: &mut Self::Buf,
        dx: &Self::Buf,
        shape: RowCopy,
        _: Checked,
    ) -> Result<()>;
    fn mean_rows(
        &self,
        dst: &mut Self::Buf,
        src: &Self::Buf,
        shape: RowMean,
        _: Checked,
    ) -> Result<()>;
    fn mean_rows_backward(
        &self,
        dsrc: &mut Self::Buf,
        ddst: &Self::Buf,
        shape: RowMean,
        _: Checked,
    ) -> Result<()>;
}

fn positive(what: &str, name: &str, v: usize) -> Result<()> {
    if v == 0 {
        bail!("{what}: {name} must be positive");
    }
    Ok(())
}

/// Writes `patches[batch * n_patches, channels * patch * patch]` from
/// `images[batch, channels, size, size]`: row `b * n_patches + py * (size/patch) + px`
/// holds the patch at (py, px), its columns ordered (channel, y, x), the
/// order of a flattened `[width, channels, patch, patch]` convolution weight.
pub fn patch_gather<D: EmbedKernel>(
    dev: &D,
    patches: &mut D::Buf,
    images: &D::Buf,
    shape: Images,
) -> Result<()> {
    let Images {
        batch,
        channels,
        size,
        patch,
    } = shape;
    if patch == 0 || !size.is_multiple_of(patch) {
        bail!("patch_gather: image size {size} is not a multiple of the patch size {patch}");
    }
    if channels == 0 || channels > 3 {
        bail!("patch_gather: {channels} channels; 1 to 3 are supported");
    }
    let n = product("patch_gather", &[batch, channels, size, size])?;
    need(dev, "patch_gather images", images, n)?;
    need(dev, "patch_gather patches", patches, n)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(images, n), (patches, n)], 0.0));
    profiled(dev, "patch_gather", w, || {
        dev.patch_gather(patches, images, shape, Checked::new())
    })
}

/// Writes the token sequence `x[batch, 1 + n_patches, width]`: token 0 is
/// `cls + pos[0]`, token `1 + i` is `patch_out[b, i] + pos[1 + i]`.
pub fn tokens_forward<D: EmbedKernel>(
    dev: &D,
    x: &mut D::Buf,
    patch_out: &D::Buf,
    cls: &D::Buf,
    pos: &D::Buf,
    shape: Tokens,
) -> Result<()> {
    let Tokens {
        batch,
        n_patches,
        width,
    } = shape;
    positive("tokens_forward", "width", width)?;
    let t = n_patches + 1;
    need(dev, "tokens x", x, product("tokens x", &[batch, t, width])?)?;
    need(
        dev,
        "tokens patch_out",
        patch_out,
        product("tokens patch_out", &[batch, n_patches, width])?,
    )?;
    need(dev, "tokens cls", cls, width)?;
    need(dev, "tokens pos", pos, product("tokens pos", &[t, width])?)?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (x, batch * t * width),
                (patch_out, batch * n_patches * width),
                (pos, t * width),
                (cls, width),
            ],
            (batch * t * width) as f64,
        )
    });
    profiled(dev, "tokens_forward", w, || {
        dev.tokens_forward(x, patch_out, cls, pos, shape, Checked::new())
    })
}

/// Backward of `tokens_forward`: WRITES `dpatch_out`, ADDS to `dcls` and `dpos`.
pub fn tokens_backward<D: EmbedKernel>(
    dev: &D,
    dpatch_out: &mut D::Buf,
    dcls: &mut D::Buf,
    dpos: &mut D::Buf,
    dx: &D::Buf,
    shape: Tokens,
) -> Result<()> {
    let Tokens {
        batch,
        n_patches,
        width,
    } = shape;
    positive("tokens_backward", "width", width)?;
    let t = n_patches + 1;
    need(
        dev,
        "tokens dx",
        dx,
        product("tokens dx", &[batch, t, width])?,
    )?;
    need(
        dev,
        "tokens dpatch_out",
        dpatch_out,
        product("tokens dpatch_out", &[batch, n_patches, width])?,
    )?;
    need(dev, "tokens dcls", dcls, width)?;
    need(
        dev,
        "tokens dpos",
        dpos,
        product("tokens dpos", &[t, width])?,
    )?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[
                (dx, batch * t * width),
                (dpatch_out, batch * n_patches * width),
                (dpos, 2 * t * width),
                (dcls, 2 * width),
            ],
            (batch * t * width) as f64,
        )
    });
    profiled(dev, "tokens_backward", w, || {
        dev.tokens_backward(dpatch_out, dcls, dpos, dx, shape, Checked::new())
    })
}

/// Writes `out[batch, width] = x[batch, tokens, width][:, 0, :]` (class-token pooling).
pub fn cls_gather<D: EmbedKernel>(
    dev: &D,
    out: &mut D::Buf,
    x: &D::Buf,
    batch: usize,
    tokens: usize,
    width: usize,
) -> Result<()> {
    positive("cls_gather", "tokens", tokens)?;
    need(
        dev,
        "cls_gather x",
        x,
        product("cls_gather x", &[batch, tokens, width])?,
    )?;
    need(
        dev,
        "cls_gather out",
        out,
        product("cls_gather out", &[batch, width])?,
    )?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(x, batch * width), (out, batch * width)], 0.0));
    profiled(dev, "cls_gather", w, || {
        dev.cls_gather(out, x, batch, tokens, width, Checked::new())
    })
}

/// Backward of `cls_gather`: ADDS `dout[b]` to `dx[b, 0]`.
pub fn cls_scatter_add<D: EmbedKernel>(
    dev: &D,
    dx: &mut D::Buf,
    dout: &D::Buf,
    batch: usize,
    tokens: usize,
    width: usize,
) -> Result<()> {
    positive("cls_scatter_add", "tokens", tokens)?;
    need(
        dev,
        "cls_scatter dx",
        dx,
        product("cls_scatter dx", &[batch, tokens, width])?,
    )?;
    need(
        dev,
        "cls_scatter dout",
        dout,
        product("cls_scatter dout", &[batch, width])?,
    )?;
    let w = dev.profiling().then(|| {
        work(
            dev,
            &[(dx, 2 * batch * width), (dout, batch * width)],
            (batch * width) as f64,
        )
    });
    profiled(dev, "cls_scatter_add", w, || {
        dev.cls_scatter_add(dx, dout, batch, tokens, width, Checked::new())
    })
}

/// For every image `b` and `j < rows`: `dst[b, dst_at + j, :]` is set to
/// (`Accumulate::Overwrite`) or added (`Accumulate::Add`) `src[s, src_at +
/// j, :]`, with `s = b`, or `s = 0` when `shape.broadcast`. `dst` is an
/// activation; `src` an activation or, broadcast, a parameter.
pub fn copy_rows<D: EmbedKernel>(
    dev: &D,
    dst: &mut D::Buf,
    src: &D::Buf,
    shape: RowCopy,
    mode: Accumulate,
) -> Result<()> {
    let (dst_len, src_len) = shape.lens("copy_rows")?;
    need(dev, "copy_rows dst", dst, dst_len)?;
    need(dev, "copy_rows src", src, src_len)?;
    let w = dev.profiling().then(|| {
        let n = shape.batch * shape.rows * shape.width;
        let src_n = if shape.broadcast {
            shape.rows * shape.width
        } else {
            n
        };
        let dst_n = if mode.adds() { 2 * n } else { n };
        let flops = if mode.adds() { n as f64 } else { 0.0 };
        work(dev, &[(dst, dst_n), (src, src_n)], flops)
    });
    profiled(dev, "copy_rows", w, || {
        dev.copy_rows(dst, src, shape, mode, Checked::new())
    })
}

/// Backward of a broadcast `copy_rows` with the same shape: ADDS
/// `dsrc[0, src_at + j, :] += Σ_b dx[b, dst_at + j, :]` (`dsrc` a parameter
/// gradient, `dx` the activation gradient of the copy's `dst`).
pub fn sum_rows_over_batch<D: EmbedKernel>(
    dev: &D,
    dsrc: &mut D::Buf,
    dx: &D::Buf,
    shape: RowCopy,
) -> Result<()> {
    if !shape.broadcast {
        bail!("sum_rows_over_batch: the backward of a broadcast copy, but the shape does not broadcast");
    }
    let (dx_len, dsrc_len) = shape.lens("sum_rows_over_batch")?;
    need(dev, "sum_rows_over_batch dsrc", dsrc, dsrc_len)?;
    need(dev, "sum_rows_over_batch dx", dx, dx_len)?;
    let w = dev.profiling().then(|| {
        let (n, m) = (
            shape.batch * shape.rows * shape.width,
            shape.rows * shape.width,
        );
        work(dev, &[(dx, n), (dsrc, 2 * m)], n as f64)
    });
    profiled(dev, "sum_rows_over_batch", w, || {
        dev.sum_rows_over_batch(dsrc, dx, shape, Checked::new())
    })
}

/// Writes `dst[b, dst_at, :] = (1/count) · Σ_{j<count} src[b, src_at + j, :]`
/// for every image `b` (average pooling over the patch tokens; both
/// activations).
pub fn mean_rows<D: EmbedKernel>(
    dev: &D,
    dst: &mut D::Buf,
    src: &D::Buf,
    shape: RowMean,
) -> Result<()> {
    let (dst_len, src_len) = shape.lens("mean_rows")?;
    need(dev, "mean_rows dst", dst, dst_len)?;
    need(dev, "mean_rows src", src, src_len)?;
    let w = dev.profiling().then(|| {
        let n = shape.batch * shape.count * shape.width;
        work(dev, &[(src, n), (dst, shape.batch * shape.width)], n as f64)
    });
    profiled(dev, "mean_rows", w, || {
        dev.mean_rows(dst, src, shape, Checked::new())
    })
}

/// Backward of `mean_rows`: ADDS `dsrc[b, src_at + j, :] += ddst[b, dst_at, :] / count`.
pub fn mean_rows_backward<D: EmbedKernel>(
    dev: &D,
    dsrc: &mut D::Buf,
    ddst: &D::Buf,
    shape: RowMean,
) -> Result<()> {
    let (ddst_len, dsrc_len) = shape.lens("mean_rows_backward")?;
    need(dev, "mean_rows_backward dsrc", dsrc, dsrc_len)?;
    need(dev, "mean_rows_backward ddst", ddst, ddst_len)?;
    let w = dev.profiling().then(|| {
        let n = shape.batch * shape.count * shape.width;
        work(
            dev,
            &[(dsrc, 2 * n), (ddst, shape.batch * shape.width)],
            n as f64,
        )
    });
    profiled(dev, "mean_rows_backward", w, || {
        dev.mean_rows_backward(dsrc, ddst, shape, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{Images, RowCopy, RowMean, Tokens};
    use crate::device::Cpu;
    use crate::ops::matmul::Accumulate::{Add, Overwrite};
    use crate::ops::Backend;
    use crate::testing::{
        act, assert_close, dot, each_buffer_short, fd_check, par, randn, random, tol, EW,
    };

    /// Two images of 4 tokens, 2 wide, from a source of 3 tokens.
    const COPY: RowCopy = RowCopy {
        batch: 2,
        width: 2,
        src_tokens: 3,
        src_at: 1,
        dst_tokens: 4,
        dst_at: 2,
        rows: 2,
        broadcast: true,
    };

    /// Two images of 5 tokens, 2 wide: the mean of tokens 1..4 into token 0
    /// of a 2-token output.
    const MEAN: RowMean = RowMean {
        batch: 2,
        width: 2,
        src_tokens: 5,
        src_at: 1,
        count: 3,
        dst_tokens: 2,
        dst_at: 0,
    };

    /// `0, 1, 2, ...` plus `offset`.
    fn counting(n: usize, offset: f32) -> Vec<f32> {
        (0..n).map(|i| i as f32 + offset).collect()
    }

    #[test]
    fn copy_rows_places_and_adds_rows() {
        // A broadcast parameter of 3 tokens: rows 1 and 2 into tokens 2 and 3 of both images.
        let src = counting(6, 100.0);
        let mut dst = vec![0.0; 16];
        super::copy_rows(&Cpu, &mut dst, &src, COPY, Overwrite).unwrap();
        let image = [0.0, 0.0, 0.0, 0.0, 102.0, 103.0, 104.0, 105.0];
        assert_eq!(&dst[..8], &image);
        assert_eq!(&dst[8..], &image);
        super::copy_rows(&Cpu, &mut dst, &src, COPY, Add).unwrap();
        assert_eq!(&dst[4..8], &[204.0, 206.0, 208.0, 210.0]);
        // Per image, 1 row from token 0 of a 2-token source into token 1.
        let per_image = RowCopy {
            src_tokens: 2,
            src_at: 0,
            dst_at: 1,
            rows: 1,
            broadcast: false,
            ..COPY
        };
        let src = counting(8, 1.0);
        super::copy_rows(&Cpu, &mut dst, &src, per_image, Overwrite).unwrap();
        assert_eq!(&dst[2..4], &[1.0, 2.0]);
        assert_eq!(&dst[10..12], &[5.0, 6.0]);
        assert_eq!(&dst[..2], &[0.0, 0.0], "token 0 untouched");
    }

    #[test]
    fn sum_rows_over_batch_adds_each_rows_batch_sum() {
        let dx = counting(16, 0.0);
        let mut dsrc = vec![1.0; 6];
        super::sum_rows_over_batch(&Cpu, &mut dsrc, &dx, COPY).unwrap();
        // Row 1 of dsrc gets token 2 of both images: (4, 5) + (12, 13).
        assert_eq!(dsrc, [1.0, 1.0, 17.0, 19.0, 21.0, 23.0]);
    }

    #[test]
    fn mean_rows_averages_the_range() {
        let src = counting(20, 0.0);
        let mut dst = vec![-1.0; 8];
        super::mean_rows(&Cpu, &mut dst, &src, MEAN).unwrap();
        // Image 0, tokens 1..4: columns (2 + 4 + 6)/3 and (3 + 5 + 7)/3.
        assert_eq!(dst, [4.0, 5.0, -1.0, -1.0, 14.0, 15.0, -1.0, -1.0]);
        let mut dsrc = vec![0.0; 20];
        super::mean_rows_backward(
            &Cpu,
            &mut dsrc,
            &[3.0, 6.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0].to_vec(),
            MEAN,
        )
        .unwrap();
        assert_eq!(
            &dsrc[..10],
            &[0.0, 0.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 0.0, 0.0]
        );
        assert!(dsrc[10..].iter().all(|&v| v == 0.0), "image 1's ddst is 0");
    }

    /// A broadcast copy's backward is `sum_rows_over_batch`; a per-image
    /// copy's is the copy with `src` and `dst` swapped, added: both the
    /// finite-difference gradients of Σ w·dst.
    #[test]
    fn row_copy_backwards_match_finite_differences() {
        let (dst0, w) = (random(16, 1), random(16, 2));
        let loss = |src: &[f32], shape: RowCopy| {
            let mut dst = dst0.clone();
            super::copy_rows(&Cpu, &mut dst, &src.to_vec(), shape, Add).unwrap();
            dot(&w, &dst)
        };
        let src = random(6, 3);
        let mut dsrc = vec![0.0; 6];
        super::sum_rows_over_batch(&Cpu, &mut dsrc, &w, COPY).unwrap();
        fd_check("broadcast copy", &src, &dsrc, 6, |s| loss(s, COPY));

        let per_image = RowCopy {
            broadcast: false,
            ..COPY
        };
        let src = random(12, 4);
        let mut dsrc = vec![0.0; 12];
        let back = RowCopy {
            src_tokens: COPY.dst_tokens,
            src_at: COPY.dst_at,
            dst_tokens: COPY.src_tokens,
            dst_at: COPY.src_at,
            ..per_image
        };
        super::copy_rows(&Cpu, &mut dsrc, &w, back, Add).unwrap();
        fd_check("per-image copy", &src, &dsrc, 12, |s| loss(s, per_image));
    }

    #[test]
    fn mean_rows_backward_matches_finite_differences() {
        let (src, w) = (random(20, 5), random(8, 6));
        let mut dsrc = vec![0.0; 20];
        super::mean_rows_backward(&Cpu, &mut dsrc, &w, MEAN).unwrap();
        fd_check("mean_rows", &src, &dsrc, 20, |s| {
            let mut dst = vec![0.0; 8];
            super::mean_rows(&Cpu, &mut dst, &s.to_vec(), MEAN).unwrap();
            dot(&w, &dst)
        });
    }

    #[test]
    fn wrong_row_shapes_are_errors() {
        for broadcast in [true, false] {
            let shape = RowCopy { broadcast, ..COPY };
            let src = if broadcast { 6 } else { 12 };
            for mode in [Overwrite, Add] {
                each_buffer_short("copy_rows", &[16, src], 0.0, |b| {
                    let [dst, src] = b else { unreachable!() };
                    super::copy_rows(&Cpu, dst, src, shape, mode)
                });
            }
        }
        each_buffer_short("sum_rows_over_batch", &[6, 16], 0.0, |b| {
            let [dsrc, dx] = b else { unreachable!() };
            super::sum_rows_over_batch(&Cpu, dsrc, dx, COPY)
        });
        each_buffer_short("mean_rows", &[8, 20], 0.0, |b| {
            let [dst, src] = b else { unreachable!() };
            super::mean_rows(&Cpu, dst, src, MEAN)
        });
        each_buffer_short("mean_rows_backward", &[20, 8], 0.0, |b| {
            let [dsrc, ddst] = b else { unreachable!() };
            super::mean_rows_backward(&Cpu, dsrc, ddst, MEAN)
        });

        // Shapes that are wrong whatever the buffers: rows past either end,
        // an overflowing range, zero width, an empty mean, an unbroadcast sum.
        let (mut big_dst, big_src) = (vec![0.0; 1000], vec![0.0; 1000]);
        for bad in [
            RowCopy { rows: 3, ..COPY },
            RowCopy { src_at: 2, ..COPY },
            RowCopy { dst_at: 3, ..COPY },
            RowCopy {
                dst_at: usize::MAX,
                ..COPY
            },
            RowCopy { width: 0, ..COPY },
        ] {
            assert!(
                super::copy_rows(&Cpu, &mut big_dst, &big_src, bad, Add).is_err(),
                "copy_rows {bad:?}"
            );
            assert!(
                super::sum_rows_over_batch(&Cpu, &mut big_dst, &big_src, bad).is_err(),
                "sum_rows_over_batch {bad:?}"
            );
        }
        let unbroadcast = RowCopy {
            broadcast: false,
            ..COPY
        };
        assert!(super::copy_rows(&Cpu, &mut big_dst, &big_src, unbroadcast, Add).is_ok());
        assert!(super::sum_rows_over_batch(&Cpu, &mut big_dst, &big_src, unbroadcast).is_err());
        for bad in [
            RowMean { count: 5, ..MEAN },
            RowMean { src_at: 3, ..MEAN },
            RowMean { dst_at: 2, ..MEAN },
            RowMean {
                src_at: usize::MAX,
                ..MEAN
            },
            RowMean { width: 0, ..MEAN },
            RowMean { count: 0, ..MEAN },
        ] {
            assert!(
                super::mean_rows(&Cpu, &mut big_dst, &big_src, bad).is_err(),
                "mean_rows {bad:?}"
            );
            assert!(
                super::mean_rows_backward(&Cpu, &mut big_dst, &big_src, bad).is_err(),
                "mean_rows_backward {bad:?}"
            );
        }
    }

    #[test]
    fn patches_follow_the_convolution_weight_order() {
        // One image, 2 channels, 4x4, patch 2: value = c*100 + y*10 + x.
        let img: Vec<f32> = (0..2)
            .flat_map(|c| {
                (0..4).flat_map(move |y| (0..4).map(move |x| (c * 100 + y * 10 + x) as f32))
            })
            .collect();
        let mut p = vec![0.0; 4 * 8];
        patch_gather(
            &mut p,
            &img,
            Images {
                batch: 1,
                channels: 2,
                size: 4,
                patch: 2,
            },
        );
        // Patch 3 is (py, px) = (1, 1): rows 2..4, cols 2..4.
        assert_eq!(
            &p[3 * 8..4 * 8],
            &[22.0, 23.0, 32.0, 33.0, 122.0, 123.0, 132.0, 133.0]
        );
    }

    #[test]
    fn tokens_backward_matches_finite_differences() {
        let (b, np, d) = (3, 4, 5);
        let t = np + 1;
        let (po, cls, pos, w) = (
            random(b * np * d, 1),
            random(d, 2),
            random(t * d, 3),
            random(b * t * d, 4),
        );
        let fwd = |po: &[f32], cls: &[f32], pos: &[f32]| {
            let mut x = vec![0.0; b * t * d];
            tokens_forward(
                &mut x,
                po,
                cls,
                pos,
                Tokens {
                    batch: b,
                    n_patches: np,
                    width: d,
                },
            );
            dot(&w, &x)
        };
        let (mut dpo, mut dcls, mut dpos) = (vec![0.0; b * np * d], vec![0.0; d], vec![0.0; t * d]);
        tokens_backward(
            &mut dpo,
            &mut dcls,
            &mut dpos,
            &w,
            Tokens {
                batch: b,
                n_patches: np,
                width: d,
            },
        );
        fd_check("tokens dpatch", &po, &dpo, 30, |po| fwd(po, &cls, &pos));
        fd_check("tokens dcls", &cls, &dcls, d, |cls| fwd(&po, cls, &pos));
        fd_check("tokens dpos", &pos, &dpos, 25, |pos| fwd(&po, &cls, pos));
    }

    #[test]
    fn cls_gather_and_scatter_are_adjoint() {
        let (b, t, d) = (2, 3, 4);
        let x = random(b * t * d, 1);
        let mut out = vec![0.0; b * d];
        cls_gather(&mut out, &x, b, t, d);
        assert_eq!(&out[d..], &x[t * d..t * d + d]);
        let mut dx = vec![1.0; b * t * d];
        cls_scatter_add(&mut dx, &out, b, t, d);
        assert_eq!(dx[t * d], 1.0 + out[d]);
        assert_eq!(dx[1], 1.0 + out[1]);
        assert_eq!(dx[d], 1.0);
    }

    #[test]
    fn wrong_shapes_are_errors() {
        let z = |n: usize| vec![0.0f32; n];
        // patch_gather: patch must divide the size; 1-3 channels; buffer lengths.
        assert!(
            super::patch_gather(
                &Cpu,
                &mut z(48),
                &z(48),
                Images {
                    batch: 1,
                    channels: 3,
                    size: 4,
                    patch: 3
                }
            )
            .is_err(),
            "patch 3 of size 4"
        );
        assert!(
            super::patch_gather(
                &Cpu,
                &mut z(48),
                &z(48),
                Images {
                    batch: 1,
                    channels: 3,
                    size: 4,
                    patch: 0
                }
            )
            .is_err(),
            "patch 0"
        );
        assert!(
            super::patch_gather(
                &Cpu,
                &mut z(64),
                &z(64),
                Images {
                    batch: 1,
                    channels: 4,
                    size: 4,
                    patch: 2
                }
            )
            .is_err(),
            "4 channels"
        );
        assert!(super::patch_gather(
            &Cpu,
            &mut z(47),
            &z(48),
            Images {
                batch: 1,
                channels: 3,
                size: 4,
                patch: 2
            }
        )
        .is_err());
        assert!(super::patch_gather(
            &Cpu,
            &mut z(48),
            &z(47),
            Images {
                batch: 1,
                channels: 3,
                size: 4,
                patch: 2
            }
        )
        .is_err());
        assert!(super::patch_gather(
            &Cpu,
            &mut z(48),
            &z(48),
            Images {
                batch: 1,
                channels: 3,
                size: 4,
                patch: 2
            }
        )
        .is_ok());
        // tokens: x, patch_out, cls (the class token), pos.
        let (b, np, d) = (2, 4, 3);
        let t = np + 1;
        let lens = [b * t * d, b * np * d, d, t * d];
        for short in 0..=lens.len() {
            let mut v: Vec<Vec<f32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &l)| z(if i == short { l - 1 } else { l }))
                .collect();
            let [x, po, cls, pos] = v.as_mut_slice() else {
                unreachable!()
            };
            assert_eq!(
                super::tokens_forward(
                    &Cpu,
                    x,
                    po,
                    cls,
                    pos,
                    Tokens {
                        batch: b,
                        n_patches: np,
                        width: d
                    }
                )
                .is_ok(),
                short == lens.len(),
                "tokens_forward, argument {short} short"
            );
            let mut w: Vec<Vec<f32>> = [b * np * d, d, t * d, b * t * d]
                .iter()
                .enumerate()
                .map(|(i, &l)| z(if i == short { l - 1 } else { l }))
                .collect();
            let [dpo, dcls, dpos, dx] = w.as_mut_slice() else {
                unreachable!()
            };
            assert_eq!(
                super::tokens_backward(
                    &Cpu,
                    dpo,
                    dcls,
                    dpos,
                    dx,
                    Tokens {
                        batch: b,
                        n_patches: np,
                        width: d
                    }
                )
                .is_ok(),
                short == lens.len(),
                "tokens_backward, argument {short} short"
            );
        }
        assert!(
            super::tokens_forward(
                &Cpu,
                &mut z(10),
                &z(10),
                &z(10),
                &z(10),
                Tokens {
                    batch: 1,
                    n_patches: 1,
                    width: 0
                }
            )
            .is_err(),
            "width 0"
        );
        assert!(super::cls_gather(&Cpu, &mut z(b * d - 1), &z(b * t * d), b, t, d).is_err());
        assert!(super::cls_gather(&Cpu, &mut z(b * d), &z(b * t * d - 1), b, t, d).is_err());
        assert!(super::cls_scatter_add(&Cpu, &mut z(b * t * d - 1), &z(b * d), b, t, d).is_err());
        assert!(super::cls_scatter_add(&Cpu, &mut z(b * t * d), &z(b * d - 1), b, t, d).is_err());
        assert!(
            super::cls_gather(&Cpu, &mut z(b * d), &z(b * t * d), b, 0, d).is_err(),
            "0 tokens"
        );
    }

    fn embedding_and_pooling_match_the_cpu<D: Backend>(dev: &D) {
        let (batch, channels, size, patch, width) = (3, 3, 32, 8, 40);
        let np = (size / patch) * (size / patch);
        let t = np + 1;
        let inputs = vec![
            act(randn(33, batch * channels * size * size, 1.0)),
            act(vec![0.0; batch * channels * size * size]),
            act(randn(34, batch * np * width, 1.0)),
            par(randn(35, width, 1.0)),
            par(randn(36, t * width, 1.0)),
            act(vec![0.0; batch * t * width]),
            act(randn(37, batch * t * width, 1.0)),
            act(randn(38, batch * np * width, 1.0)),
            par(randn(39, width, 1.0)),
            par(randn(40, t * width, 1.0)),
            act(vec![0.0; batch * width]),
            act(randn(41, batch * width, 1.0)),
        ];
        let (c, g) = crate::on_both!(dev, inputs, |be, [images, patches, patch_out, cls, pos, x, dx, dpatch, dcls, dpos, pooled, dpooled]| {
            let tokens = Tokens { batch, n_patches: np, width };
            super::patch_gather(be, patches, images, Images { batch, channels, size, patch }).unwrap();
            super::tokens_forward(be, x, patch_out, cls, pos, tokens).unwrap();
            super::tokens_backward(be, dpatch, dcls, dpos, dx, tokens).unwrap();
            super::cls_gather(be, pooled, x, batch, t, width).unwrap();
            super::cls_scatter_add(be, dx, dpooled, batch, t, width).unwrap();
        });
        assert_close(
            &format!("embed {:?}", dev.precision()),
            &g,
            &c,
            tol(dev.precision(), EW),
        );
    }

    crate::on_every_device!(embedding_and_pooling_match_the_cpu);

    /// A DeiT-like sequence of 2 prefix tokens, 16 patches and a position
    /// embedding over all of them, assembled, pooled both ways and taken
    /// back, with the parameters (fp32 on a bf16 device) and the
    /// activations in the kinds the model allocates.
    fn row_ops_match_the_cpu<D: Backend>(dev: &D) {
        let (batch, width, np) = (5, 40, 16);
        let t = np + 2;
        let prefix = RowCopy {
            batch,
            width,
            src_tokens: 2,
            src_at: 0,
            dst_tokens: t,
            dst_at: 0,
            rows: 2,
            broadcast: true,
        };
        let pos = RowCopy {
            src_tokens: t,
            rows: t,
            ..prefix
        };
        let patches = RowCopy {
            src_tokens: np,
            dst_at: 2,
            rows: np,
            broadcast: false,
            ..prefix
        };
        let dist_token = RowCopy {
            src_tokens: t,
            src_at: 1,
            dst_tokens: 1,
            rows: 1,
            broadcast: false,
            ..prefix
        };
        let mean = RowMean {
            batch,
            width,
            src_tokens: t,
            src_at: 2,
            count: np,
            dst_tokens: 1,
            dst_at: 0,
        };
        let inputs = vec![
            par(randn(60, 2 * width, 1.0)),
            par(randn(61, t * width, 1.0)),
            act(randn(62, batch * np * width, 1.0)),
            act(vec![0.0; batch * t * width]),
            act(vec![0.0; batch * width]),
            act(vec![0.0; batch * width]),
            act(randn(63, batch * t * width, 1.0)),
            act(randn(64, batch * width, 1.0)),
            act(randn(65, batch * width, 1.0)),
            act(vec![0.0; batch * np * width]),
            par(randn(66, 2 * width, 1.0)),
            par(randn(67, t * width, 1.0)),
        ];
        let (c, g) = crate::on_both!(dev, inputs, |be, [prefix_tokens, pos_embed, patch_out, x, pooled, averaged, dx, dpooled, daveraged, dpatch, dprefix, dpos]| {
            super::copy_rows(be, x, prefix_tokens, prefix, Overwrite).unwrap();
            super::copy_rows(be, x, patch_out, patches, Overwrite).unwrap();
            super::copy_rows(be, x, pos_embed, pos, Add).unwrap();
            super::copy_rows(be, pooled, x, dist_token, Overwrite).unwrap();
            super::mean_rows(be, averaged, x, mean).unwrap();
            let dist_back = RowCopy { src_tokens: 1, src_at: 0, dst_tokens: t, dst_at: 1, ..dist_token };
            super::copy_rows(be, dx, dpooled, dist_back, Add).unwrap();
            super::mean_rows_backward(be, dx, daveraged, mean).unwrap();
            let patches_back = RowCopy { src_tokens: t, src_at: 2, dst_tokens: np, dst_at: 0, ..patches };
            super::copy_rows(be, dpatch, dx, patches_back, Overwrite).unwrap();
            super::sum_rows_over_batch(be, dprefix, dx, prefix).unwrap();
            super::sum_rows_over_batch(be, dpos, dx, pos).unwrap();
        });
        assert_close(
            &format!("row ops {:?}", dev.precision()),
            &g,
            &c,
            tol(dev.precision(), EW),
        );
    }

    crate::on_every_device!(row_ops_match_the_cpu);
}
