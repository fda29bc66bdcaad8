//! Launchers of `kernels/attention.cu`. The fused kernels (one block per
//! (image, head), K and V in shared memory) run when the block's shared
//! memory fits the device (ViT: T ≤ 256, head_dim ≤ 128; T = 197, dh = 64
//! needs 118 KiB); otherwise the unfused path runs: strided-batched cuBLAS
//! GEMMs per image plus row-softmax kernels, which is also the benchmark
//! baseline. With `--short-attention on` (`CudaOptions`), sequences
//! of at most 64 tokens with head_dim a multiple of 16 run the short
//! kernels instead (tensor cores in bf16; ViT-B/32: 50 tokens).

use super::AttentionKernel;
use crate::device::cuda::{CudaBuf, DriverResultExt};
use crate::device::{BufKind, Cuda, Device, Precision};
use crate::ops::matmul::cuda::{gemm, Mat, RowMajorGemm};
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Warps per block of the fused kernels (ATT_WARPS in the kernel file).
const WARPS: usize = 8;
/// Largest sequence and head width the fused kernels are written for.
pub const MAX_FUSED_TOKENS: usize = 256;
pub const MAX_FUSED_HEAD_DIM: usize = 128;

/// Shared memory of the fused forward: K, V padded rows, and per warp a q row and a score row.
pub fn forward_smem_bytes(t: usize, dh: usize) -> usize {
    4 * (2 * t * (dh + 1) + WARPS * (dh + t))
}

/// Shared memory of the fused backward: two padded [T, dh] tiles, D[T], and
/// per warp a vector and two rows of T.
pub fn backward_smem_bytes(t: usize, dh: usize) -> usize {
    4 * (2 * t * (dh + 1) + t + WARPS * (dh + 2 * t))
}

fn fused_fits(be: &Cuda, t: usize, dh: usize, smem: usize) -> bool {
    t <= MAX_FUSED_TOKENS && dh <= MAX_FUSED_HEAD_DIM && smem <= be.max_shared_bytes()
}

fn block_config(batch: usize, heads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((batch * heads) as u32, 1, 1),
        block_dim: ((WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// Largest sequence and head width of the short kernels.
pub const MAX_SHORT_TOKENS: usize = 64;
pub const MAX_SHORT_HEAD_DIM: usize = 128;
/// Threads per block of the short kernels (SHORT_WARPS = 4 in the kernel file).
const SHORT_THREADS: u32 = 128;

/// The short kernels' shared-memory layout (kernels/attention.cu): T and
/// the columns padded to TP (a multiple of 16), rows of head tiles dh + 8
/// elements, rows of P and dS TP + 8, and one fp32 tile of rows max(TP, dh) + 4.
fn short_layout(precision: Precision, t: usize, dh: usize) -> (usize, usize, usize) {
    let tp = t.div_ceil(16) * 16;
    let elem = match precision {
        Precision::F32 => 4,
        Precision::Bf16 => 2,
    };
    (
        elem * tp * (dh + 8),
        elem * tp * (tp + 8),
        4 * tp * (tp.max(dh) + 4),
    )
}

/// Shared memory of the short forward: Q, K, V, P and the fp32 tile.
pub fn short_forward_smem_bytes(precision: Precision, t: usize, dh: usize) -> usize {
    let (head, square, tile) = short_layout(precision, t, dh);
    3 * head + square + tile
}

/// Shared memory of the short backward: Q, K, V, dO, P, dS and the fp32 tile.
pub fn short_backward_smem_bytes(precision: Precision, t: usize, dh: usize) -> usize {
    let (head, square, tile) = short_layout(precision, t, dh);
    4 * head + 2 * square + tile
}

/// Whether the short kernels take `t` tokens of width `dh` with `smem` bytes on this device.
fn short_fits(be: &Cuda, t: usize, dh: usize, smem: usize) -> bool {
    (1..=MAX_SHORT_TOKENS).contains(&t)
        && dh.is_multiple_of(16)
        && dh <= MAX_SHORT_HEAD_DIM
        && smem <= be.max_shared_bytes()
}

fn short_config(batch: usize, heads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((batch * heads) as u32, 1, 1),
        block_dim: (SHORT_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

impl AttentionKernel for Cuda {
    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        probs: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        ok: Checked,
    ) -> Result<()> {
        if self.options().short_attention {
            short_forward(
                self, out, probs, q, k, v, batch, tokens, heads, head_dim, ok,
            )
        } else {
            fused_forward(
                self, out, probs, q, k, v, batch, tokens, heads, head_dim, ok,
            )
        }
    }
    fn attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        probs: &CudaBuf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        ok: Checked,
    ) -> Result<()> {
        if self.options().short_attention {
            short_backward(
                self, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim, ok,
            )
        } else {
            fused_backward(
                self, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim, ok,
            )
        }
    }

    /// `attention_cls_forward(act_t* out, act_t* probs, const act_t* q,
    /// const act_t* k, const act_t* v, int tokens, int heads, int head_dim)`.
    fn class_token_attention_forward(
        &self,
        out: &mut CudaBuf,
        probs: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()> {
        if batch * heads * tokens == 0 {
            return Ok(());
        }
        let smem = 4 * (head_dim + tokens);
        let a = [tokens, heads, head_dim].map(|v| v as i32);
        let (o, p) = (
            self.act_mut(out, "class-token attention out")?,
            self.act_mut(probs, "class-token attention probs")?,
        );
        let (qp, kp, vp) = (
            self.act(q, "class-token attention q")?,
            self.act(k, "class-token attention k")?,
            self.act(v, "class-token attention v")?,
        );
        let f = self.function("attention", "attention_cls_forward", smem)?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&o)
            .arg(&p)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2]);
        unsafe { l.launch(class_token_config(batch, heads, smem)) }.cu_with_context(|| format!("attention_cls_forward launch (batch {batch}, tokens {tokens}, heads {heads}, head_dim {head_dim})"))?;
        Ok(())
    }

    /// `attention_cls_backward(act_t* dq, act_t* dk, act_t* dv, const act_t*
    /// dout, const act_t* q, const act_t* k, const act_t* v, const act_t*
    /// probs, int tokens, int heads, int head_dim)`.
    fn class_token_attention_backward(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        probs: &CudaBuf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
        _: Checked,
    ) -> Result<()> {
        if batch * heads * tokens == 0 {
            return Ok(());
        }
        let smem = 4 * (2 * head_dim + tokens);
        let a = [tokens, heads, head_dim].map(|v| v as i32);
        let (dqp, dkp, dvp) = (
            self.act_mut(dq, "class-token attention dq")?,
            self.act_mut(dk, "class-token attention dk")?,
            self.act_mut(dv, "class-token attention dv")?,
        );
        let (dop, qp, kp, vp, pp) = (
            self.act(dout, "class-token attention dout")?,
            self.act(q, "class-token attention q")?,
            self.act(k, "class-token attention k")?,
            self.act(v, "class-token attention v")?,
            self.act(probs, "class-token attention probs")?,
        );
        let f = self.function("attention", "attention_cls_backward", smem)?;
        let mut l = self.stream().launch_builder(&f);
        l.arg(&dqp)
            .arg(&dkp)
            .arg(&dvp)
            .arg(&dop)
            .arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&pp)
            .arg(&a[0])
            .arg(&a[1])
            .arg(&a[2]);
        unsafe { l.launch(class_token_config(batch, heads, smem)) }.cu_with_context(|| format!("attention_cls_backward launch (batch {batch}, tokens {tokens}, heads {heads}, head_dim {head_dim})"))?;
        Ok(())
    }
}

/// Threads per block of the class-token kernels (CLS_THREADS in the kernel file).
const CLASS_TOKEN_THREADS: u32 = 128;

fn class_token_config(batch: usize, heads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((batch * heads) as u32, 1, 1),
        block_dim: (CLASS_TOKEN_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// `attention_short_forward(act_t* out, act_t* probs, const act_t* q, const
/// act_t* k, const act_t* v, int tokens, int heads, int head_dim)`, or
/// `fused_forward` where the short kernel does not take the shape.
#[allow(clippy::too_many_arguments)]
pub fn short_forward(
    be: &Cuda,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ok: Checked,
) -> Result<()> {
    let smem = short_forward_smem_bytes(be.precision(), tokens, head_dim);
    if batch * heads == 0 || !short_fits(be, tokens, head_dim, smem) {
        return fused_forward(be, out, probs, q, k, v, batch, tokens, heads, head_dim, ok);
    }
    let a = [tokens, heads, head_dim].map(|v| v as i32);
    let (o, p) = (
        be.act_mut(out, "attention out")?,
        be.act_mut(probs, "attention probs")?,
    );
    let (qp, kp, vp) = (
        be.act(q, "attention q")?,
        be.act(k, "attention k")?,
        be.act(v, "attention v")?,
    );
    let f = be.function("attention", "attention_short_forward", smem)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&o)
        .arg(&p)
        .arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(short_config(batch, heads, smem)) }.cu_with_context(|| format!("attention_short_forward launch (batch {batch}, tokens {tokens}, heads {heads}, head_dim {head_dim})"))?;
    Ok(())
}

/// `attention_short_backward(act_t* dq, act_t* dk, act_t* dv, const act_t*
/// dout, const act_t* q, const act_t* k, const act_t* v, const act_t* probs,
/// int tokens, int heads, int head_dim)`, or `fused_backward` where the
/// short kernel does not take the shape.
#[allow(clippy::too_many_arguments)]
pub fn short_backward(
    be: &Cuda,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
    dout: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    probs: &CudaBuf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ok: Checked,
) -> Result<()> {
    let smem = short_backward_smem_bytes(be.precision(), tokens, head_dim);
    if batch * heads == 0 || !short_fits(be, tokens, head_dim, smem) {
        return fused_backward(
            be, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim, ok,
        );
    }
    let a = [tokens, heads, head_dim].map(|v| v as i32);
    let (dqp, dkp, dvp) = (
        be.act_mut(dq, "attention dq")?,
        be.act_mut(dk, "attention dk")?,
        be.act_mut(dv, "attention dv")?,
    );
    let (dop, qp, kp, vp, pp) = (
        be.act(dout, "attention dout")?,
        be.act(q, "attention q")?,
        be.act(k, "attention k")?,
        be.act(v, "attention v")?,
        be.act(probs, "attention probs")?,
    );
    let f = be.function("attention", "attention_short_backward", smem)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dqp)
        .arg(&dkp)
        .arg(&dvp)
        .arg(&dop)
        .arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&pp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(short_config(batch, heads, smem)) }.cu_with_context(|| format!("attention_short_backward launch (batch {batch}, tokens {tokens}, heads {heads}, head_dim {head_dim})"))?;
    Ok(())
}

/// `attention_forward(act_t* out, act_t* probs, const act_t* q, const
/// act_t* k, const act_t* v, int tokens, int heads, int head_dim)`, or the
/// unfused path where the fused kernel does not fit.
#[allow(clippy::too_many_arguments)]
pub fn fused_forward(
    be: &Cuda,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ok: Checked,
) -> Result<()> {
    if batch * heads * tokens * head_dim == 0 {
        return Ok(());
    }
    let smem = forward_smem_bytes(tokens, head_dim);
    if !fused_fits(be, tokens, head_dim, smem) {
        return unfused_forward(be, out, probs, q, k, v, batch, tokens, heads, head_dim, ok);
    }
    let a = [tokens, heads, head_dim].map(|v| v as i32);
    let (o, p) = (
        be.act_mut(out, "attention out")?,
        be.act_mut(probs, "attention probs")?,
    );
    let (qp, kp, vp) = (
        be.act(q, "attention q")?,
        be.act(k, "attention k")?,
        be.act(v, "attention v")?,
    );
    let f = be.function("attention", "attention_forward", smem)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&o)
        .arg(&p)
        .arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(block_config(batch, heads, smem)) }.cu_with_context(|| format!("attention_forward launch (batch {batch}, tokens {tokens}, heads {heads}, head_dim {head_dim})"))?;
    Ok(())
}

/// `attention_backward(act_t* dq, act_t* dk, act_t* dv, const act_t* dout,
/// const act_t* q, const act_t* k, const act_t* v, const act_t* probs, int
/// tokens, int heads, int head_dim)`, or the unfused path where the fused
/// kernel does not fit.
#[allow(clippy::too_many_arguments)]
pub fn fused_backward(
    be: &Cuda,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
    dout: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    probs: &CudaBuf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    ok: Checked,
) -> Result<()> {
    if batch * heads * tokens * head_dim == 0 {
        return Ok(());
    }
    let smem = backward_smem_bytes(tokens, head_dim);
    if !fused_fits(be, tokens, head_dim, smem) {
        return unfused_backward(
            be, dq, dk, dv, dout, q, k, v, probs, batch, tokens, heads, head_dim, ok,
        );
    }
    let a = [tokens, heads, head_dim].map(|v| v as i32);
    let (dqp, dkp, dvp) = (
        be.act_mut(dq, "attention dq")?,
        be.act_mut(dk, "attention dk")?,
        be.act_mut(dv, "attention dv")?,
    );
    let (dop, qp, kp, vp, pp) = (
        be.act(dout, "attention dout")?,
        be.act(q, "attention q")?,
        be.act(k, "attention k")?,
        be.act(v, "attention v")?,
        be.act(probs, "attention probs")?,
    );
    let f = be.function("attention", "attention_backward", smem)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dqp)
        .arg(&dkp)
        .arg(&dvp)
        .arg(&dop)
        .arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&pp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(block_config(batch, heads, smem)) }.cu_with_context(|| format!("attention_backward launch (batch {batch}, tokens {tokens}, heads {heads}, head_dim {head_dim})"))?;
    Ok(())
}

/// Per-image batched product over the heads of one image: operand `a` is
/// a head of `[T, D]` (stride dh between heads) or a `[T, T]` probability
/// block (stride T²), likewise `b` and `c`.
struct HeadGemm {
    t: usize,
    dh: usize,
    d: usize,
    heads: usize,
}

impl HeadGemm {
    /// `(row stride, batch stride)` of a head operand (`wide`) or a T×T block.
    fn layout(&self, wide: bool) -> (usize, usize) {
        if wide {
            (self.d, self.dh)
        } else {
            (self.t, self.t * self.t)
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn spec(
        &self,
        m: usize,
        n: usize,
        k: usize,
        (ta, a_wide): (bool, bool),
        (tb, b_wide): (bool, bool),
        c_wide: bool,
        alpha: f32,
    ) -> RowMajorGemm {
        let (lda, sa) = self.layout(a_wide);
        let (ldb, sb) = self.layout(b_wide);
        let (ldc, sc) = self.layout(c_wide);
        RowMajorGemm {
            m,
            n,
            k,
            trans_a: ta,
            trans_b: tb,
            lda,
            ldb,
            ldc,
            alpha,
            beta: 0.0,
            batch: self.heads,
            stride_a: sa,
            stride_b: sb,
            stride_c: sc,
        }
    }
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// An activation as a cuBLAS matrix.
fn act_mat(be: &Cuda, b: &CudaBuf, what: &str) -> Result<Mat> {
    Ok(Mat {
        ptr: be.act(b, what)?,
        dtype: be.operand_type(),
    })
}

fn act_mat_mut(be: &Cuda, b: &mut CudaBuf, what: &str) -> Result<Mat> {
    Ok(Mat {
        ptr: be.act_mut(b, what)?,
        dtype: be.operand_type(),
    })
}

/// Unfused forward: per image, `S = q kᵀ/√dh` (cuBLAS), softmax
/// (`softmax_rows(act_t* x, int rows, int cols)`), `out = P v` (cuBLAS).
#[allow(clippy::too_many_arguments)]
pub fn unfused_forward(
    be: &Cuda,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    _: Checked,
) -> Result<()> {
    let (t, dh) = (tokens, head_dim);
    let hg = HeadGemm {
        t,
        dh,
        d: heads * dh,
        heads,
    };
    let scale = 1.0 / (dh as f32).sqrt();
    let (om, pm) = (
        act_mat_mut(be, out, "attention out")?,
        act_mat_mut(be, probs, "attention probs")?,
    );
    let (qm, km, vm) = (
        act_mat(be, q, "attention q")?,
        act_mat(be, k, "attention k")?,
        act_mat(be, v, "attention v")?,
    );
    for b in 0..batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            pm.at(p0),
            qm.at(x0),
            km.at(x0),
            &hg.spec(t, t, dh, (false, true), (true, true), false, scale),
        )?;
    }
    let rows = batch * heads * t;
    let (r, c) = (rows as i32, t as i32);
    let f = be.function("attention", "softmax_rows", 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&pm.ptr).arg(&r).arg(&c);
    unsafe { l.launch(rows_config(rows)) }.cu_context("softmax_rows launch")?;
    for b in 0..batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            om.at(x0),
            pm.at(p0),
            vm.at(x0),
            &hg.spec(t, dh, t, (false, false), (false, true), true, 1.0),
        )?;
    }
    Ok(())
}

/// Unfused backward: `dP = dout vᵀ`, `dV = Pᵀ dout`, `dS = P∘(dP − rowsum(dP∘P))`
/// (`softmax_rows_backward(act_t* dp, const act_t* p, int rows, int cols)`),
/// `dQ = dS k/√dh`, `dK = dSᵀ q/√dh`.
#[allow(clippy::too_many_arguments)]
pub fn unfused_backward(
    be: &Cuda,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
    dout: &CudaBuf,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    probs: &CudaBuf,
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    _: Checked,
) -> Result<()> {
    let (t, dh) = (tokens, head_dim);
    let hg = HeadGemm {
        t,
        dh,
        d: heads * dh,
        heads,
    };
    let scale = 1.0 / (dh as f32).sqrt();
    let len = batch * heads * t * t;
    let mut ds = be.alloc(len, BufKind::Activation)?;
    let dsm = act_mat_mut(be, &mut ds, "attention score gradients")?;
    let (dqm, dkm, dvm) = (
        act_mat_mut(be, dq, "attention dq")?,
        act_mat_mut(be, dk, "attention dk")?,
        act_mat_mut(be, dv, "attention dv")?,
    );
    let (dom, qm, km, vm, pm) = (
        act_mat(be, dout, "attention dout")?,
        act_mat(be, q, "attention q")?,
        act_mat(be, k, "attention k")?,
        act_mat(be, v, "attention v")?,
        act_mat(be, probs, "attention probs")?,
    );
    for b in 0..batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            dsm.at(p0),
            dom.at(x0),
            vm.at(x0),
            &hg.spec(t, t, dh, (false, true), (true, true), false, 1.0),
        )?;
        gemm(
            be,
            dvm.at(x0),
            pm.at(p0),
            dom.at(x0),
            &hg.spec(t, dh, t, (true, false), (false, true), true, 1.0),
        )?;
    }
    let rows = batch * heads * t;
    let (r, c) = (rows as i32, t as i32);
    let f = be.function("attention", "softmax_rows_backward", 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dsm.ptr).arg(&pm.ptr).arg(&r).arg(&c);
    unsafe { l.launch(rows_config(rows)) }.cu_context("softmax_rows_backward launch")?;
    for b in 0..batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            dqm.at(x0),
            dsm.at(p0),
            km.at(x0),
            &hg.spec(t, dh, t, (false, false), (false, true), true, scale),
        )?;
        gemm(
            be,
            dkm.at(x0),
            dsm.at(p0),
            qm.at(x0),
            &hg.spec(t, dh, t, (true, false), (false, true), true, scale),
        )?;
    }
    Ok(())
}
