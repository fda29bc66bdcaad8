//! Patch embedding input, token assembly and class-token pooling:
//!
//! ```text
//! patch_gather   patches[b·P + p, (c, y, x)] = image[b, c, py·s + y, px·s + x]
//! tokens         x[b, 0] = cls + pos[0],  x[b, 1+i] = patch_out[b, i] + pos[1+i]
//!   backward     dpatch_out[b, i] = dx[b, 1+i],  dcls += Σ_b dx[b, 0],  dpos += Σ_b dx[b]
//! cls pooling    out[b] = x[b, 0];  backward dx[b, 0] += dout[b]
//! ```
//! The patch embedding itself is a dense linear layer over the gathered
//! patches with the convolution weight `[D, C, s, s]` read as `[D, C·s·s]`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

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

#[cfg(test)]
mod tests {
    use super::cpu::*;
    use super::{Images, Tokens};
    use crate::device::Cpu;
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, dot, fd_check, par, randn, random, tol, EW};

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
}
