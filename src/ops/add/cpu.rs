//! Residual connections on the CPU: rayon chunks, one pass over the memory.

use super::AddKernel;
use crate::device::Cpu;
use crate::ops::simd::ELEMENTWISE_CHUNK;
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

impl AddKernel for Cpu {
    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize, _: Checked) -> Result<()> {
        dst[..len]
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(src[..len].par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(d, s)| {
                for (d, s) in d.iter_mut().zip(s) {
                    *d += s;
                }
            });
        Ok(())
    }
    fn add(
        &self,
        dst: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        len: usize,
        _: Checked,
    ) -> Result<()> {
        let (a, b) = (&a[..len], &b[..len]);
        dst[..len]
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(a.par_chunks(ELEMENTWISE_CHUNK))
            .zip(b.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|((d, a), b)| {
                for ((d, a), b) in d.iter_mut().zip(a).zip(b) {
                    *d = a + b;
                }
            });
        Ok(())
    }
}
