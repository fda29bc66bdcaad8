//! Residual connections, elementwise over activations:
//!
//! ```text
//! add         dst = a + b      (a residual connection in the forward pass)
//! add_assign  dst += src       (the same, in place; and gradients that meet)
//! ```
//! The CPU makes one pass over the memory for `add`; CUDA runs `add` as a
//! copy and then `add_assign`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::{need, profiled, work, Checked};
use crate::device::Device;
use anyhow::Result;

/// Device bodies of the residual connections (call `add` / `add_assign`).
pub trait AddKernel: Device {
    fn add_assign(
        &self,
        dst: &mut Self::Buf,
        src: &Self::Buf,
        len: usize,
        _: Checked,
    ) -> Result<()>;
    fn add(
        &self,
        dst: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        len: usize,
        _: Checked,
    ) -> Result<()>;
}

/// Writes `dst[i] = a[i] + b[i]` for `i < len`.
pub fn add<D: AddKernel>(
    dev: &D,
    dst: &mut D::Buf,
    a: &D::Buf,
    b: &D::Buf,
    len: usize,
) -> Result<()> {
    need(dev, "add dst", dst, len)?;
    need(dev, "add a", a, len)?;
    need(dev, "add b", b, len)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(dst, len), (a, len), (b, len)], len as f64));
    profiled(dev, "add", w, || dev.add(dst, a, b, len, Checked::new()))
}

/// Adds `dst[i] += src[i]` for `i < len`.
pub fn add_assign<D: AddKernel>(dev: &D, dst: &mut D::Buf, src: &D::Buf, len: usize) -> Result<()> {
    need(dev, "add_assign dst", dst, len)?;
    need(dev, "add_assign src", src, len)?;
    let w = dev
        .profiling()
        .then(|| work(dev, &[(dst, 2 * len), (src, len)], len as f64));
    profiled(dev, "add_assign", w, || {
        dev.add_assign(dst, src, len, Checked::new())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Cpu, Precision};
    use crate::ops::simd::ELEMENTWISE_CHUNK;
    use crate::ops::Backend;
    use crate::testing::{act, assert_close, randn};

    /// The one-pass `add` writes a + b over several rayon chunks and a
    /// ragged tail, and nothing past `len`.
    #[test]
    fn add_writes_the_sum_and_nothing_past_len() {
        let len = 3 * ELEMENTWISE_CHUNK + 17;
        let (a, b) = (randn(3, len + 5, 1.0), randn(4, len + 5, 1.0));
        let mut dst = vec![f32::NAN; len + 5];
        add(&Cpu, &mut dst, &a, &b, len).unwrap();
        for i in 0..len {
            assert_eq!(dst[i], a[i] + b[i], "element {i}");
        }
        assert!(dst[len..].iter().all(|v| v.is_nan()), "wrote past len");
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let (mut d, s) = (vec![0.0; 4], vec![0.0; 3]);
        assert!(add(&Cpu, &mut d, &s, &s.clone(), 4).is_err());
        assert!(add_assign(&Cpu, &mut d, &s, 4).is_err());
        assert!(add_assign(&Cpu, &mut vec![0.0; 2], &vec![0.0; 4], 4).is_err());
    }

    fn adds_match_the_cpu<D: Backend>(dev: &D) {
        let n = 10_007;
        let inputs = vec![
            act(randn(1, n, 1.0)),
            act(randn(2, n, 1.0)),
            act(randn(3, n, 1.0)),
        ];
        let (c, g) = crate::on_both!(dev, inputs, |be, [a, b, d]| {
            add_assign(be, a, b, n - 3).unwrap();
            add(be, d, a, b, n - 5).unwrap();
        });
        // The sums round to bf16 on a bf16 device.
        let tolerance = if dev.precision() == Precision::Bf16 {
            4e-3
        } else {
            0.0
        };
        assert_close(&format!("add {:?}", dev.precision()), &g, &c, tolerance);
    }

    crate::on_every_device!(adds_match_the_cpu);
}
