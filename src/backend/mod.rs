//! The operation interface that the model, the losses and the optimizer are
//! written against, once, for every device.
//!
//! A backend owns flat buffers of real numbers (`Backend::Buf`) and the
//! operations on them. `CpuBackend` (rayon + faer's matmul, fp32) is the
//! reference; `CudaBackend` (feature `cuda`) implements the same contract with
//! handwritten kernels and cuBLAS. Every operation's CPU code lives in
//! `src/ops/<op>/cpu.rs` and its CUDA code in `src/ops/<op>/cuda.rs`; the
//! contract (shapes, what is overwritten and what is accumulated) is written
//! here, once.
//!
//! Conventions for every method:
//! - All tensors are row-major and contiguous. Shapes are given in the doc as
//!   `[rows, cols]`; the `usize` arguments carry them.
//! - "writes" means the output is overwritten; "adds" means the result is
//!   added to what the output already holds (gradients of parameters are
//!   always added, so one zeroing per step suffices).
//! - A buffer may be longer than the shape says; only the leading elements
//!   are touched. No method may alias an output with an input.
//! - Scalars that the host needs (losses, norms) are written into device
//!   buffers and read with `download` only when they are printed, so a
//!   training step needs no host synchronization.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use anyhow::Result;

pub use cpu::CpuBackend;

/// What a buffer holds, so that a backend may store the kinds at different
/// precisions. The CPU backend stores everything in fp32; the CUDA backend in
/// bf16 mixed precision stores `Activation` in bf16 and the rest in fp32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufKind {
    /// Master weights, their gradients, optimizer moments, loss accumulators.
    Param,
    /// Activations and their gradients.
    Activation,
    /// Per-row statistics kept at full precision (LayerNorm mean and 1/std).
    Statistic,
}

/// Settings of the fused loss over the logits (see `ops::loss`).
///
/// Per sample `i`, with student logits `s`, teacher logits `t`, label `y`,
/// averaged over the batch:
///
/// ```text
/// ce_weight * CE_ls(s, y) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))
///   + feature_weight * (MSE(s, t) + 1 - cos(s, t))
/// ```
///
/// `CE_ls` is cross-entropy against the label smoothed by `label_smoothing`
/// (target `1 - ls + ls/C` on the label and `ls/C` elsewhere). MSE is the mean
/// over the C logits of the sample; cos is the cosine of the two logit rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitLossConfig {
    pub ce_weight: f32,
    pub label_smoothing: f32,
    pub kd_weight: f32,
    pub temperature: f32,
    pub feature_weight: f32,
}

/// Hyper-parameters of one AdamW step (see `ops::adamw`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay: `p -= lr * weight_decay * p`.
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u32,
    /// Clip the global gradient norm to this value; `None` for no clipping.
    pub max_grad_norm: Option<f32>,
}

/// Per-channel normalization and geometry for turning raw images into model
/// input (see `ops::image`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageTransform {
    pub channels: usize,
    /// Source height and width (the stored images, after augmentation).
    pub src_height: usize,
    pub src_width: usize,
    /// Model input size (square).
    pub dst_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The operations the ViT needs, forward and backward.
pub trait Backend: Send + Sync {
    /// A flat device buffer of real numbers.
    type Buf: Send + Sync;

    /// A short name for messages: "cpu" or "cuda (NVIDIA H100 ...)".
    fn name(&self) -> String;

    // ---- memory -------------------------------------------------------

    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize, kind: BufKind) -> Result<Self::Buf>;
    /// A buffer holding a copy of `host`.
    fn upload(&self, host: &[f32], kind: BufKind) -> Result<Self::Buf>;
    /// Overwrite the leading `host.len()` elements of `buf` with `host`.
    fn write(&self, buf: &mut Self::Buf, host: &[f32]) -> Result<()>;
    /// All elements of `buf`, as fp32, on the host (synchronizes).
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of elements of `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Set the leading `len` elements of `buf` to zero.
    fn zero(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
    /// Writes `dst[i] = src[i]` for `i < len`.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<()>;
    /// Adds `dst[i] += src[i]` for `i < len` (residual connections and their
    /// gradients).
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf, len: usize) -> Result<()>;
    /// Writes `dst[i] = a[i] + b[i]` for `i < len` (a residual connection in
    /// the forward pass). By default a copy, then an add; the CPU backend
    /// makes one pass over the memory instead of three.
    fn add(&self, dst: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, len: usize) -> Result<()> {
        self.copy(dst, a, len)?;
        self.add_assign(dst, b, len)
    }

    // ---- matrix products (ops::matmul) ---------------------------------

    /// `out[m, n] (+)= op(a) · op(b)` with `op(a)` of shape `[m, k]` (stored
    /// `[k, m]` when `trans_a`) and `op(b)` of shape `[k, n]` (stored `[n, k]`
    /// when `trans_b`). Adds to `out` when `accumulate`, else writes.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        accumulate: bool,
    ) -> Result<()>;

    /// Dense linear layer: writes `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ + bias[out]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        bias: &Self::Buf,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<()>;

    /// Low-rank linear layer (ops::lowrank): writes `h[rows, r] = x · vᵀ` and
    /// `y[rows, out] = h · uᵀ + bias`, with `v: [r, inp]`, `u: [out, r]`.
    /// `h` is kept for the backward pass (`dU = dyᵀ h`).
    #[allow(clippy::too_many_arguments)]
    fn lowrank_forward(
        &self,
        y: &mut Self::Buf,
        h: &mut Self::Buf,
        x: &Self::Buf,
        v: &Self::Buf,
        u: &Self::Buf,
        bias: &Self::Buf,
        rows: usize,
        inp: usize,
        rank: usize,
        out: usize,
    ) -> Result<()>;

    /// Adds the column sums of `dy[rows, cols]` to `dbias[cols]`.
    fn bias_backward(&self, dbias: &mut Self::Buf, dy: &Self::Buf, rows: usize, cols: usize) -> Result<()>;

    // ---- elementwise (ops::gelu) ---------------------------------------

    /// Writes `out[i] = gelu(x[i])`, exact: `x/2 · (1 + erf(x/√2))`.
    fn gelu_forward(&self, out: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<()>;
    /// Writes `dx[i] = dout[i] · gelu'(x[i])`.
    fn gelu_backward(&self, dx: &mut Self::Buf, x: &Self::Buf, dout: &Self::Buf, len: usize) -> Result<()>;

    // ---- normalization (ops::layernorm) --------------------------------

    /// LayerNorm over the last axis of `x[rows, cols]`: writes `out`, and the
    /// per-row `mean[rows]` and `rstd[rows] = 1/sqrt(var + eps)` (biased
    /// variance, computed in two passes) for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Result<()>;

    /// LayerNorm backward: ADDS the input gradient to `dx` (the residual
    /// stream's gradient already lives there) and the parameter gradients to
    /// `dgamma`, `dbeta`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        gamma: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    // ---- attention (ops::attention) ------------------------------------

    /// Multi-head self-attention core for `batch` images of `tokens` tokens,
    /// `heads` heads of width `head_dim`; `q, k, v, out: [batch, tokens,
    /// heads*head_dim]` (head h occupies columns `h*head_dim..(h+1)*head_dim`).
    /// Writes `probs[batch, heads, tokens, tokens] = softmax(q kᵀ / √head_dim)`
    /// (row-wise) and `out = probs · v`.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        probs: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Attention backward: WRITES `dq`, `dk`, `dv` from `dout`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        probs: &Self::Buf,
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    // ---- embedding and pooling (ops::embed) ----------------------------

    /// Writes `patches[batch * n_patches, channels * patch * patch]` from
    /// `images[batch, channels, size, size]`: row `b * n_patches + py * (size/patch) + px`
    /// holds the patch at (py, px), its columns ordered (channel, y, x), the
    /// order of a flattened `[width, channels, patch, patch]` convolution weight.
    #[allow(clippy::too_many_arguments)]
    fn patch_gather(
        &self,
        patches: &mut Self::Buf,
        images: &Self::Buf,
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<()>;

    /// Writes the token sequence `x[batch, 1 + n_patches, width]`: token 0 is
    /// `cls + pos[0]`, token `1 + i` is `patch_out[b, i] + pos[1 + i]`.
    #[allow(clippy::too_many_arguments)]
    fn tokens_forward(
        &self,
        x: &mut Self::Buf,
        patch_out: &Self::Buf,
        cls: &Self::Buf,
        pos: &Self::Buf,
        batch: usize,
        n_patches: usize,
        width: usize,
    ) -> Result<()>;

    /// Backward of `tokens_forward`: WRITES `dpatch_out`, ADDS to `dcls` and `dpos`.
    #[allow(clippy::too_many_arguments)]
    fn tokens_backward(
        &self,
        dpatch_out: &mut Self::Buf,
        dcls: &mut Self::Buf,
        dpos: &mut Self::Buf,
        dx: &Self::Buf,
        batch: usize,
        n_patches: usize,
        width: usize,
    ) -> Result<()>;

    /// Writes `out[batch, width] = x[batch, tokens, width][:, 0, :]` (class-token pooling).
    fn cls_gather(&self, out: &mut Self::Buf, x: &Self::Buf, batch: usize, tokens: usize, width: usize) -> Result<()>;

    /// Backward of `cls_gather`: ADDS `dout[b]` to `dx[b, 0]`.
    fn cls_scatter_add(&self, dx: &mut Self::Buf, dout: &Self::Buf, batch: usize, tokens: usize, width: usize) -> Result<()>;

    // ---- data (ops::image) ---------------------------------------------

    /// Writes model input `out[batch, channels, dst, dst]` from raw bytes
    /// `src[batch, channels, src_h, src_w]`: bilinear resize with
    /// PyTorch's `interpolate(mode="bilinear", align_corners=False)`
    /// sampling, then `(value/255 - mean[c]) / std[c]`.
    fn images_from_bytes(&self, out: &mut Self::Buf, src: &[u8], batch: usize, t: &ImageTransform) -> Result<()>;

    // ---- losses (ops::loss) --------------------------------------------

    /// Fused loss over the logits `s[batch, classes]` (see `LogitLossConfig`):
    /// WRITES `ds` (the gradient of the batch-mean loss, times `scale`) and
    /// ADDS `scale` × the batch-mean loss to `loss[0]`. `teacher` is required
    /// when `kd_weight` or `feature_weight` is non-zero; `labels` when
    /// `ce_weight` is non-zero.
    #[allow(clippy::too_many_arguments)]
    fn logit_loss(
        &self,
        ds: &mut Self::Buf,
        loss: &mut Self::Buf,
        s: &Self::Buf,
        teacher: Option<&Self::Buf>,
        labels: &[u32],
        batch: usize,
        classes: usize,
        cfg: &LogitLossConfig,
        scale: f32,
    ) -> Result<()>;

    /// Feature-matching loss of one feature map `s, t: [rows, cols]`:
    /// `scale · (MSE(s, t) + mean over rows of (1 - cos(s_row, t_row)))`,
    /// MSE averaged over all `rows*cols` elements. ADDS the loss to `loss[0]`
    /// and the gradient with respect to `s` to `ds`.
    #[allow(clippy::too_many_arguments)]
    fn feature_loss(
        &self,
        ds: &mut Self::Buf,
        loss: &mut Self::Buf,
        s: &Self::Buf,
        t: &Self::Buf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> Result<()>;

    // ---- optimizer (ops::adamw) ----------------------------------------

    /// ADDS `Σ x[i]²` over `i < len` to `acc[0]` (global gradient norm).
    fn sum_squares(&self, acc: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<()>;

    /// One AdamW step on `param[len]` with gradient `grad`, moments `m`, `v`.
    /// With `hp.max_grad_norm = Some(c)`, the gradient is first multiplied by
    /// `min(1, c / sqrt(grad_norm_sq[0]))` (the global norm over all
    /// parameters, summed by `sum_squares`). Then, with `g` the scaled gradient:
    /// `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
    ///  p -= lr (wd p + (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps))`.
    #[allow(clippy::too_many_arguments)]
    fn adamw_update(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        grad_norm_sq: &Self::Buf,
        len: usize,
        hp: &AdamWStep,
    ) -> Result<()>;
}
