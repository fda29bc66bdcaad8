//! The fused residual add + LayerNorm on the CPU: the two ops' own CPU
//! bodies one after the other (the reference the CUDA kernels are held to).

use super::AddLayerNormKernel;
use crate::device::Cpu;
use crate::ops::add::AddKernel;
use crate::ops::layernorm::cpu::{layernorm_backward, layernorm_forward};
use crate::ops::Checked;
use anyhow::Result;

impl AddLayerNormKernel for Cpu {
    fn add_layernorm_forward(
        &self,
        sum: &mut Vec<f32>,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        rows: usize,
        cols: usize,
        eps: f32,
        ok: Checked,
    ) -> Result<()> {
        self.add(sum, a, b, rows * cols, ok)?;
        layernorm_forward(out, mean, rstd, sum, gamma, beta, rows, cols, eps);
        Ok(())
    }
    fn add_layernorm_backward(
        &self,
        dx: &mut Vec<f32>,
        dbranch: &mut Vec<f32>,
        dgamma: &mut Vec<f32>,
        dbeta: &mut Vec<f32>,
        dout: &Vec<f32>,
        sum: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        gamma: &Vec<f32>,
        rows: usize,
        cols: usize,
        _: Checked,
    ) -> Result<()> {
        layernorm_backward(dx, dgamma, dbeta, dout, sum, mean, rstd, gamma, rows, cols);
        let n = rows * cols;
        dbranch[..n].copy_from_slice(&dx[..n]);
        Ok(())
    }
}
