//! The fused residual add + LayerNorm on the CPU: the two ops' own CPU
//! bodies one after the other (the reference the CUDA kernels are held to).

use super::{AddLayerNormKernel, Grads, Outputs, Terms};
use crate::device::Cpu;
use crate::ops::add::AddKernel;
use crate::ops::layernorm::cpu::{layernorm_backward, layernorm_forward};
use crate::ops::layernorm::{self, Params, Saved};
use crate::ops::{Checked, Rows};
use anyhow::Result;

impl AddLayerNormKernel for Cpu {
    fn add_layernorm_forward(
        &self,
        out: Outputs<'_, Vec<f32>>,
        terms: Terms<'_, Vec<f32>>,
        params: Params<'_, Vec<f32>>,
        shape: Rows,
        eps: f32,
        ok: Checked,
    ) -> Result<()> {
        let Outputs {
            sum,
            out,
            mean,
            rstd,
        } = out;
        self.add(sum, terms.a, terms.b, shape.rows * shape.cols, ok)?;
        let out = layernorm::Outputs { out, mean, rstd };
        layernorm_forward(out.slices(), sum, params.slices(), shape, eps);
        Ok(())
    }
    fn add_layernorm_backward(
        &self,
        grads: Grads<'_, Vec<f32>>,
        dout: &Vec<f32>,
        saved: Saved<'_, Vec<f32>>,
        gamma: &Vec<f32>,
        shape: Rows,
        _: Checked,
    ) -> Result<()> {
        let Grads {
            dx,
            dbranch,
            dgamma,
            dbeta,
        } = grads;
        let ln_grads = layernorm::Grads {
            dx: &mut *dx,
            dgamma,
            dbeta,
        };
        layernorm_backward(ln_grads.slices(), dout, saved.slices(), gamma, shape);
        let n = shape.rows * shape.cols;
        dbranch[..n].copy_from_slice(&dx[..n]);
        Ok(())
    }
}
