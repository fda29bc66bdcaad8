//! Launchers of `kernels/gelu.cu` (grid-stride, one thread per element);
//! one kernel per direction, the activation an argument.

use super::{Activation, GeluKernel, Saved};
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::Cuda;
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "gelu";
    GELU_FORWARD = "gelu_forward",
    GELU_BACKWARD = "gelu_backward",
}

/// The kernels' `act` argument: `ACT_GELU`, `ACT_GELU_TANH`,
/// `ACT_QUICK_GELU` of `kernels/gelu.cu`.
fn kernel_code(act: Activation) -> i32 {
    match act {
        Activation::Gelu => 0,
        Activation::GeluTanh => 1,
        Activation::QuickGelu => 2,
    }
}

impl GeluKernel for Cuda {
    /// `gelu_forward(act_t* out, const act_t* x, u64 n, int act)`.
    fn gelu_forward(
        &self,
        out: &mut CudaBuf,
        x: &CudaBuf,
        len: usize,
        act: Activation,
        _: Checked,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (n, code) = (len as u64, kernel_code(act));
        let (o, xp) = (self.act_mut(out, "gelu out")?, self.act(x, "gelu x")?);
        let f = self.function(GELU_FORWARD, 0)?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&o).arg(&xp).arg(&n).arg(&code);
        unsafe { l.launch(self.elementwise_config(len)) }
            .cu_with_context(|| format!("gelu_forward launch ({len} elements, {})", act.name()))?;
        Ok(())
    }

    /// `gelu_backward(act_t* dx, const act_t* x, const act_t* dout, u64 n,
    /// int act)`; evaluates Φ(x) again rather than reading it off `y` (bf16
    /// on the mixed-precision path: y/x would keep only 8 bits of Φ).
    fn gelu_backward(
        &self,
        dx: &mut CudaBuf,
        Saved { x, .. }: Saved<'_, CudaBuf>,
        dout: &CudaBuf,
        len: usize,
        act: Activation,
        _: Checked,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (n, code) = (len as u64, kernel_code(act));
        let (d, xp, dop) = (
            self.act_mut(dx, "gelu dx")?,
            self.act(x, "gelu x")?,
            self.act(dout, "gelu dout")?,
        );
        let f = self.function(GELU_BACKWARD, 0)?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&d).arg(&xp).arg(&dop).arg(&n).arg(&code);
        unsafe { l.launch(self.elementwise_config(len)) }
            .cu_with_context(|| format!("gelu_backward launch ({len} elements, {})", act.name()))?;
        Ok(())
    }
}
