//! Launchers of `kernels/attention.cu`. The fused kernels (one block per
//! (image, head), K and V in shared memory) run when the block's shared
//! memory fits the device (ViT: T ≤ 256, head_dim ≤ 128; T = 197, dh = 64
//! needs 118 KiB); otherwise the unfused path runs: strided-batched cuBLAS
//! GEMMs per image plus row-softmax kernels, which is also the benchmark
//! baseline. With `--short-attention on` (`CudaOptions`), sequences
//! of at most 64 tokens with head_dim a multiple of 16 run the short
//! kernels instead (tensor cores in bf16; ViT-B/32: 50 tokens).
//!
//! Every launcher takes the sizes as one `AttentionShape` and `q, k, v`
//! (and `dq, dk, dv`) as one `Qkv`; the six fused, short and class-token
//! kernels share two argument lists (`launch_forward`, `launch_backward`).

use super::{AttentionKernel, AttentionShape, Qkv};
use crate::device::cuda::{CudaBuf, DriverResultExt, Kernel};
use crate::device::{BufKind, Cuda, Device, Precision};
use crate::ops::matmul::cuda::{gemm, Mat, RowMajorGemm};
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

crate::cuda_kernels! {
    "attention";
    FUSED_FORWARD = "attention_forward",
    FUSED_BACKWARD = "attention_backward",
    SHORT_FORWARD = "attention_short_forward",
    SHORT_BACKWARD = "attention_short_backward",
    CLASS_TOKEN_FORWARD = "attention_cls_forward",
    CLASS_TOKEN_BACKWARD = "attention_cls_backward",
    SOFTMAX_ROWS = "softmax_rows",
    SOFTMAX_ROWS_BACKWARD = "softmax_rows_backward",
}

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

/// Threads per block of the fused kernels.
const FUSED_THREADS: usize = WARPS * 32;

/// Largest sequence and head width of the short kernels.
pub const MAX_SHORT_TOKENS: usize = 64;
pub const MAX_SHORT_HEAD_DIM: usize = 128;
/// Threads per block of the short kernels (SHORT_WARPS = 4 in the kernel file).
const SHORT_THREADS: usize = 128;

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

/// Threads per block of the class-token kernels (CLS_THREADS in the kernel file).
const CLASS_TOKEN_THREADS: usize = 128;

/// One launch of a kernel with one block per (image, head).
#[derive(Clone, Copy)]
struct Launch {
    /// The kernel of `kernels/attention.cu`.
    kernel: Kernel,
    /// The names of its buffers in error messages.
    names: &'static Names,
    threads: usize,
    smem: usize,
}

/// The names of the buffers of one kernel family, for error messages.
struct Names {
    out: &'static str,
    probs: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    dout: &'static str,
    dq: &'static str,
    dk: &'static str,
    dv: &'static str,
}

const FULL: Names = Names {
    out: "attention out",
    probs: "attention probs",
    q: "attention q",
    k: "attention k",
    v: "attention v",
    dout: "attention dout",
    dq: "attention dq",
    dk: "attention dk",
    dv: "attention dv",
};

const CLASS_TOKEN: Names = Names {
    out: "class-token attention out",
    probs: "class-token attention probs",
    q: "class-token attention q",
    k: "class-token attention k",
    v: "class-token attention v",
    dout: "class-token attention dout",
    dq: "class-token attention dq",
    dk: "class-token attention dk",
    dv: "class-token attention dv",
};

impl Launch {
    fn config(&self, shape: AttentionShape) -> LaunchConfig {
        Cuda::tiled_config(shape.pairs(), self.threads, self.smem)
    }
}

/// The sizes the kernels take: `int tokens, int heads, int head_dim`.
fn kernel_sizes(shape: AttentionShape) -> [i32; 3] {
    [shape.tokens, shape.heads, shape.head_dim].map(|v| v as i32)
}

/// `kernel(act_t* out, act_t* probs, const act_t* q, const act_t* k, const
/// act_t* v, int tokens, int heads, int head_dim)`, one block per (image,
/// head).
fn launch_forward(
    be: &Cuda,
    launch: Launch,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    x: Qkv<&CudaBuf>,
    shape: AttentionShape,
) -> Result<()> {
    let (names, kernel) = (launch.names, launch.kernel);
    let a = kernel_sizes(shape);
    let (o, p) = (be.act_mut(out, names.out)?, be.act_mut(probs, names.probs)?);
    let (qp, kp, vp) = (
        be.act(x.q, names.q)?,
        be.act(x.k, names.k)?,
        be.act(x.v, names.v)?,
    );
    let f = be.function(kernel, launch.smem)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&o)
        .arg(&p)
        .arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&a[0])
        .arg(&a[1])
        .arg(&a[2]);
    unsafe { l.launch(launch.config(shape)) }
        .cu_with_context(|| launch_context(kernel.name(), shape))?;
    Ok(())
}

/// `kernel(act_t* dq, act_t* dk, act_t* dv, const act_t* dout, const act_t*
/// q, const act_t* k, const act_t* v, const act_t* probs, int tokens, int
/// heads, int head_dim)`, one block per (image, head).
fn launch_backward(
    be: &Cuda,
    launch: Launch,
    grads: Qkv<&mut CudaBuf>,
    dout: &CudaBuf,
    x: Qkv<&CudaBuf>,
    probs: &CudaBuf,
    shape: AttentionShape,
) -> Result<()> {
    let (names, kernel) = (launch.names, launch.kernel);
    let a = kernel_sizes(shape);
    let (dqp, dkp, dvp) = (
        be.act_mut(grads.q, names.dq)?,
        be.act_mut(grads.k, names.dk)?,
        be.act_mut(grads.v, names.dv)?,
    );
    let (dop, qp, kp, vp, pp) = (
        be.act(dout, names.dout)?,
        be.act(x.q, names.q)?,
        be.act(x.k, names.k)?,
        be.act(x.v, names.v)?,
        be.act(probs, names.probs)?,
    );
    let f = be.function(kernel, launch.smem)?;
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
    unsafe { l.launch(launch.config(shape)) }
        .cu_with_context(|| launch_context(kernel.name(), shape))?;
    Ok(())
}

/// The error context of a failed launch.
fn launch_context(kernel: &str, s: AttentionShape) -> String {
    format!(
        "{kernel} launch (batch {}, tokens {}, heads {}, head_dim {})",
        s.batch, s.tokens, s.heads, s.head_dim
    )
}

impl AttentionKernel for Cuda {
    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        probs: &mut CudaBuf,
        x: Qkv<&CudaBuf>,
        shape: AttentionShape,
        ok: Checked,
    ) -> Result<()> {
        if self.options().short_attention {
            short_forward(self, out, probs, x, shape, ok)
        } else {
            fused_forward(self, out, probs, x, shape, ok)
        }
    }
    fn attention_backward(
        &self,
        grads: Qkv<&mut CudaBuf>,
        dout: &CudaBuf,
        x: Qkv<&CudaBuf>,
        probs: &CudaBuf,
        shape: AttentionShape,
        ok: Checked,
    ) -> Result<()> {
        if self.options().short_attention {
            short_backward(self, grads, dout, x, probs, shape, ok)
        } else {
            fused_backward(self, grads, dout, x, probs, shape, ok)
        }
    }

    /// `attention_cls_forward(act_t* out, act_t* probs, const act_t* q,
    /// const act_t* k, const act_t* v, int tokens, int heads, int head_dim)`.
    fn class_token_attention_forward(
        &self,
        out: &mut CudaBuf,
        probs: &mut CudaBuf,
        x: Qkv<&CudaBuf>,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()> {
        if shape.class_token_probs_len() == 0 {
            return Ok(());
        }
        let launch = Launch {
            kernel: CLASS_TOKEN_FORWARD,
            names: &CLASS_TOKEN,
            threads: CLASS_TOKEN_THREADS,
            smem: 4 * (shape.head_dim + shape.tokens),
        };
        launch_forward(self, launch, out, probs, x, shape)
    }

    /// `attention_cls_backward(act_t* dq, act_t* dk, act_t* dv, const act_t*
    /// dout, const act_t* q, const act_t* k, const act_t* v, const act_t*
    /// probs, int tokens, int heads, int head_dim)`.
    fn class_token_attention_backward(
        &self,
        grads: Qkv<&mut CudaBuf>,
        dout: &CudaBuf,
        x: Qkv<&CudaBuf>,
        probs: &CudaBuf,
        shape: AttentionShape,
        _: Checked,
    ) -> Result<()> {
        if shape.class_token_probs_len() == 0 {
            return Ok(());
        }
        let launch = Launch {
            kernel: CLASS_TOKEN_BACKWARD,
            names: &CLASS_TOKEN,
            threads: CLASS_TOKEN_THREADS,
            smem: 4 * (2 * shape.head_dim + shape.tokens),
        };
        launch_backward(self, launch, grads, dout, x, probs, shape)
    }
}

/// `attention_short_forward` (`launch_forward`'s arguments), or
/// `fused_forward` where the short kernel does not take the shape.
pub fn short_forward(
    be: &Cuda,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    x: Qkv<&CudaBuf>,
    shape: AttentionShape,
    ok: Checked,
) -> Result<()> {
    let smem = short_forward_smem_bytes(be.precision(), shape.tokens, shape.head_dim);
    if shape.pairs() == 0 || !short_fits(be, shape.tokens, shape.head_dim, smem) {
        return fused_forward(be, out, probs, x, shape, ok);
    }
    let launch = Launch {
        kernel: SHORT_FORWARD,
        names: &FULL,
        threads: SHORT_THREADS,
        smem,
    };
    launch_forward(be, launch, out, probs, x, shape)
}

/// `attention_short_backward` (`launch_backward`'s arguments), or
/// `fused_backward` where the short kernel does not take the shape.
pub fn short_backward(
    be: &Cuda,
    grads: Qkv<&mut CudaBuf>,
    dout: &CudaBuf,
    x: Qkv<&CudaBuf>,
    probs: &CudaBuf,
    shape: AttentionShape,
    ok: Checked,
) -> Result<()> {
    let smem = short_backward_smem_bytes(be.precision(), shape.tokens, shape.head_dim);
    if shape.pairs() == 0 || !short_fits(be, shape.tokens, shape.head_dim, smem) {
        return fused_backward(be, grads, dout, x, probs, shape, ok);
    }
    let launch = Launch {
        kernel: SHORT_BACKWARD,
        names: &FULL,
        threads: SHORT_THREADS,
        smem,
    };
    launch_backward(be, launch, grads, dout, x, probs, shape)
}

/// `attention_forward` (`launch_forward`'s arguments), or the unfused path
/// where the fused kernel does not fit.
pub fn fused_forward(
    be: &Cuda,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    x: Qkv<&CudaBuf>,
    shape: AttentionShape,
    ok: Checked,
) -> Result<()> {
    if shape.is_empty() {
        return Ok(());
    }
    let smem = forward_smem_bytes(shape.tokens, shape.head_dim);
    if !fused_fits(be, shape.tokens, shape.head_dim, smem) {
        return unfused_forward(be, out, probs, x, shape, ok);
    }
    let launch = Launch {
        kernel: FUSED_FORWARD,
        names: &FULL,
        threads: FUSED_THREADS,
        smem,
    };
    launch_forward(be, launch, out, probs, x, shape)
}

/// `attention_backward` (`launch_backward`'s arguments), or the unfused
/// path where the fused kernel does not fit.
pub fn fused_backward(
    be: &Cuda,
    grads: Qkv<&mut CudaBuf>,
    dout: &CudaBuf,
    x: Qkv<&CudaBuf>,
    probs: &CudaBuf,
    shape: AttentionShape,
    ok: Checked,
) -> Result<()> {
    if shape.is_empty() {
        return Ok(());
    }
    let smem = backward_smem_bytes(shape.tokens, shape.head_dim);
    if !fused_fits(be, shape.tokens, shape.head_dim, smem) {
        return unfused_backward(be, grads, dout, x, probs, shape, ok);
    }
    let launch = Launch {
        kernel: FUSED_BACKWARD,
        names: &FULL,
        threads: FUSED_THREADS,
        smem,
    };
    launch_backward(be, launch, grads, dout, x, probs, shape)
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

/// An operand of `HeadGemm`: a head's columns of `[T, D]` or a `[T, T]`
/// probability block.
#[derive(Clone, Copy)]
enum Layout {
    Head,
    Probs,
}

impl HeadGemm {
    fn new(shape: AttentionShape) -> Self {
        HeadGemm {
            t: shape.tokens,
            dh: shape.head_dim,
            d: shape.width(),
            heads: shape.heads,
        }
    }
    /// `(row stride, batch stride)` of an operand.
    fn layout(&self, layout: Layout) -> (usize, usize) {
        match layout {
            Layout::Head => (self.d, self.dh),
            Layout::Probs => (self.t, self.t * self.t),
        }
    }
    /// `c = alpha · op(a) · op(b)` of `(m, n, k)`, each operand with its
    /// layout and `a`, `b` with whether they are transposed.
    fn spec(
        &self,
        (m, n, k): (usize, usize, usize),
        (ta, a_layout): (bool, Layout),
        (tb, b_layout): (bool, Layout),
        c_layout: Layout,
        alpha: f32,
    ) -> RowMajorGemm {
        let (lda, sa) = self.layout(a_layout);
        let (ldb, sb) = self.layout(b_layout);
        let (ldc, sc) = self.layout(c_layout);
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
pub fn unfused_forward(
    be: &Cuda,
    out: &mut CudaBuf,
    probs: &mut CudaBuf,
    x: Qkv<&CudaBuf>,
    shape: AttentionShape,
    _: Checked,
) -> Result<()> {
    use Layout::{Head, Probs};
    let (t, dh, heads) = (shape.tokens, shape.head_dim, shape.heads);
    let hg = HeadGemm::new(shape);
    let scale = shape.scale();
    let (om, pm) = (
        act_mat_mut(be, out, "attention out")?,
        act_mat_mut(be, probs, "attention probs")?,
    );
    let (qm, km, vm) = (
        act_mat(be, x.q, "attention q")?,
        act_mat(be, x.k, "attention k")?,
        act_mat(be, x.v, "attention v")?,
    );
    for b in 0..shape.batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            pm.at(p0),
            qm.at(x0),
            km.at(x0),
            &hg.spec((t, t, dh), (false, Head), (true, Head), Probs, scale),
        )?;
    }
    let rows = shape.pairs() * t;
    let (r, c) = (rows as i32, t as i32);
    let f = be.function(SOFTMAX_ROWS, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&pm.ptr).arg(&r).arg(&c);
    unsafe { l.launch(Cuda::warp_per_row_config(rows)) }.cu_context("softmax_rows launch")?;
    for b in 0..shape.batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            om.at(x0),
            pm.at(p0),
            vm.at(x0),
            &hg.spec((t, dh, t), (false, Probs), (false, Head), Head, 1.0),
        )?;
    }
    Ok(())
}

/// Unfused backward: `dP = dout vᵀ`, `dV = Pᵀ dout`, `dS = P∘(dP − rowsum(dP∘P))`
/// (`softmax_rows_backward(act_t* dp, const act_t* p, int rows, int cols)`),
/// `dQ = dS k/√dh`, `dK = dSᵀ q/√dh`.
pub fn unfused_backward(
    be: &Cuda,
    grads: Qkv<&mut CudaBuf>,
    dout: &CudaBuf,
    x: Qkv<&CudaBuf>,
    probs: &CudaBuf,
    shape: AttentionShape,
    _: Checked,
) -> Result<()> {
    use Layout::{Head, Probs};
    let (t, dh, heads) = (shape.tokens, shape.head_dim, shape.heads);
    let hg = HeadGemm::new(shape);
    let scale = shape.scale();
    let len = shape.probs_len();
    let mut ds = be.alloc(len, BufKind::Activation)?;
    let dsm = act_mat_mut(be, &mut ds, "attention score gradients")?;
    let (dqm, dkm, dvm) = (
        act_mat_mut(be, grads.q, "attention dq")?,
        act_mat_mut(be, grads.k, "attention dk")?,
        act_mat_mut(be, grads.v, "attention dv")?,
    );
    let (dom, qm, km, vm, pm) = (
        act_mat(be, dout, "attention dout")?,
        act_mat(be, x.q, "attention q")?,
        act_mat(be, x.k, "attention k")?,
        act_mat(be, x.v, "attention v")?,
        act_mat(be, probs, "attention probs")?,
    );
    for b in 0..shape.batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            dsm.at(p0),
            dom.at(x0),
            vm.at(x0),
            &hg.spec((t, t, dh), (false, Head), (true, Head), Probs, 1.0),
        )?;
        gemm(
            be,
            dvm.at(x0),
            pm.at(p0),
            dom.at(x0),
            &hg.spec((t, dh, t), (true, Probs), (false, Head), Head, 1.0),
        )?;
    }
    let rows = shape.pairs() * t;
    let (r, c) = (rows as i32, t as i32);
    let f = be.function(SOFTMAX_ROWS_BACKWARD, 0)?;
    let mut l = be.stream().launch_builder(&f);
    l.arg(&dsm.ptr).arg(&pm.ptr).arg(&r).arg(&c);
    unsafe { l.launch(Cuda::warp_per_row_config(rows)) }
        .cu_context("softmax_rows_backward launch")?;
    for b in 0..shape.batch {
        let (x0, p0) = (b * t * hg.d, b * heads * t * t);
        gemm(
            be,
            dqm.at(x0),
            dsm.at(p0),
            km.at(x0),
            &hg.spec((t, dh, t), (false, Probs), (false, Head), Head, scale),
        )?;
        gemm(
            be,
            dkm.at(x0),
            dsm.at(p0),
            qm.at(x0),
            &hg.spec((t, dh, t), (true, Probs), (false, Head), Head, scale),
        )?;
    }
    Ok(())
}
