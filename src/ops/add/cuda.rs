//! Launcher of `kernels/add.cu` (grid-stride, one thread per element).

use super::AddKernel;
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::{Cuda, Device};
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::PushKernelArg;

crate::cuda_kernels! {
    "add";
    ADD_ASSIGN = "add_assign",
}

impl AddKernel for Cuda {
    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf, len: usize, _: Checked) -> Result<()> {
        add_assign_kernel(self, dst, src, len)
    }
    fn add(
        &self,
        dst: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        len: usize,
        _: Checked,
    ) -> Result<()> {
        self.copy(dst, a, len)?;
        add_assign_kernel(self, dst, b, len)
    }
}

/// `add_assign(act_t* dst, const act_t* src, u64 n)`.
fn add_assign_kernel(dev: &Cuda, dst: &mut CudaBuf, src: &CudaBuf, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let n = len as u64;
    let (d, s) = (
        dev.act_mut(dst, "add_assign dst")?,
        dev.act(src, "add_assign src")?,
    );
    let f = dev.function(ADD_ASSIGN, 0)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&d).arg(&s).arg(&n);
    unsafe { l.launch(dev.elementwise_config(len)) }
        .cu_with_context(|| format!("add_assign launch ({len} elements)"))?;
    Ok(())
}
