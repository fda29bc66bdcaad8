//! Flags shared by several subcommands, and the choice of device.
//!
//! Model and training code are generic over `ops::Backend` (a device with
//! every op); a subcommand packs its work into a `WithBackend` value and
//! `dispatch` runs it on the CPU or the GPU that `--device` names.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use effrank_engine::data::{Augment, Normalize};
use effrank_engine::device::Cpu;
use effrank_engine::factorize::{
    BlockRange, FactorInit, FromTeacher, LayerSet, StudentPlan, Targets, DEFAULT_CALIBRATION,
};
use effrank_engine::model::import::ImportOptions;
use effrank_engine::ops::gelu::Activation;
use effrank_engine::ops::{self, Backend};
use effrank_engine::options::{ComputeOptions, ComputeRecord, DeviceKind, SimdChoice, Switch};
use effrank_engine::train::{AdamWConfig, FitOptions};

/// Where to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU (rayon, fp32): the reference, fine for small models.
    Cpu,
    /// The first CUDA GPU: handwritten kernels and cuBLAS, bf16 mixed
    /// precision (bf16 activations, fp32 master weights and optimizer).
    Cuda,
    /// The first CUDA GPU with everything in fp32 (the reference for the
    /// bf16 path; slower).
    CudaFp32,
    /// The GPU when one is usable, else the CPU (says which).
    Auto,
}

/// Where to compute and every choice of code path that can change a result
/// (`options::ComputeOptions`). Each switch not given falls back to its
/// environment variable (unset or `0`: auto; `1`: the named path; anything
/// else an error), then to `auto`. All of it is recorded in every
/// checkpoint's run metadata and in the teacher-logit cache key.
#[derive(Args, Debug, Clone)]
pub struct ComputeFlags {
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
    /// The last block runs after attention on the class-token rows alone,
    /// with the class token's query alone, when the loss reads only the
    /// logits (auto: on for cpu, off for cuda) [env: EFFRANK_EVERY_TOKEN=1
    /// off, EFFRANK_CUDA_CLASS_TOKEN_TAIL=1 on].
    #[arg(long, value_enum)]
    pub class_token_tail: Option<Switch>,
    /// Split a small model's training batch in two halves computed at once
    /// (auto: on for cpu, off for cuda) [env: EFFRANK_WHOLE_BATCHES=1 off].
    #[arg(long, value_enum)]
    pub batch_split: Option<Switch>,
    /// CUDA: attention for sequences of at most 64 tokens on tensor cores
    /// (auto: off; not yet verified on a GPU) [env:
    /// EFFRANK_CUDA_SHORT_ATTENTION=1 on].
    #[arg(long, value_enum)]
    pub short_attention: Option<Switch>,
    /// CUDA: each residual add and the LayerNorm that reads it as one op
    /// (auto: off; not yet verified on a GPU) [env:
    /// EFFRANK_CUDA_FUSED_ADD_LN=1 on].
    #[arg(long, value_enum)]
    pub fused_add_layernorm: Option<Switch>,
    /// CUDA: the kernels that only the ViT families other than the plain
    /// one need (DeiT distilled, DeiT-III, DINOv2, registers, CLIP, average
    /// pooling; `model::family`) (auto: off, so such a model is refused on
    /// cuda; not yet verified on a GPU).
    #[arg(long, value_enum)]
    pub family_kernels: Option<Switch>,
    /// CPU: the attention backward's AVX-512 register tiles at head width 16
    /// (auto: on where the CPU has AVX-512) [env:
    /// EFFRANK_ATTENTION_PRODUCTS=1 off].
    #[arg(long, value_enum)]
    pub attention_tiles: Option<Switch>,
    /// CPU: the vector instruction set (auto: the widest this CPU has)
    /// [env: EFFRANK_SIMD].
    #[arg(long, value_enum)]
    pub simd: Option<SimdChoice>,
    /// Time every op and print a table at the end (changes no result)
    /// [env: EFFRANK_PROFILE=1].
    #[arg(long)]
    pub profile: bool,
}

impl ComputeFlags {
    /// The options: each flag given, else its environment variable.
    pub fn options(&self) -> Result<ComputeOptions> {
        self.options_over(ComputeOptions::from_env()?)
    }

    /// The flags given, over `fallback` (what the environment asked for).
    pub fn options_over(&self, fallback: ComputeOptions) -> Result<ComputeOptions> {
        Ok(ComputeOptions {
            class_token_tail: self.class_token_tail.unwrap_or(fallback.class_token_tail),
            batch_split: self.batch_split.unwrap_or(fallback.batch_split),
            short_attention: self.short_attention.unwrap_or(fallback.short_attention),
            fused_add_layernorm: self
                .fused_add_layernorm
                .unwrap_or(fallback.fused_add_layernorm),
            attention_tiles: self.attention_tiles.unwrap_or(fallback.attention_tiles),
            family_kernels: self.family_kernels.unwrap_or(fallback.family_kernels),
            simd: self.simd.unwrap_or(fallback.simd),
            profile: self.profile || fallback.profile,
        })
    }
}

/// Work that runs on whichever device `dispatch` picks.
pub trait WithBackend {
    type Output;
    /// Runs on `be`; `compute` says what computes it (the paths the model
    /// takes, and what the run records).
    fn run<B: Backend>(self, be: &B, compute: &ComputeRecord) -> Result<Self::Output>;
}

/// Runs `work` on the device `flags.device` names, with its options.
pub fn dispatch<W: WithBackend>(flags: &ComputeFlags, quiet: bool, work: W) -> Result<W::Output> {
    let options = flags.options()?;
    ops::configure_cpu(&options.resolve(DeviceKind::Cpu), options.profile)?;
    let on_cpu = |work: W| work.run(&Cpu, &ComputeRecord::for_device(&options, &Cpu));
    match flags.device {
        DeviceArg::Cpu => on_cpu(work),
        DeviceArg::Cuda => run_cuda(work, &options, false),
        DeviceArg::CudaFp32 => run_cuda(work, &options, true),
        DeviceArg::Auto => {
            if cuda_usable() {
                if !quiet {
                    eprintln!("device: cuda (auto)");
                }
                run_cuda(work, &options, false)
            } else {
                if !quiet {
                    eprintln!("device: cpu (auto: no usable CUDA GPU found)");
                }
                on_cpu(work)
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_usable() -> bool {
    effrank_engine::device::cuda::cuda_available()
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn run_cuda<W: WithBackend>(work: W, options: &ComputeOptions, fp32: bool) -> Result<W::Output> {
    use effrank_engine::device::cuda::CudaOptions;
    use effrank_engine::device::{Cuda, Precision};
    let precision = if fp32 {
        Precision::F32
    } else {
        Precision::Bf16
    };
    let paths = options.resolve(DeviceKind::Cuda);
    let cuda_options = CudaOptions {
        short_attention: paths.short_attention,
        profile: options.profile,
    };
    let be = Cuda::with_options(0, precision, cuda_options)?;
    // A profiled device prints its table when dropped (`--profile`).
    work.run(&be, &ComputeRecord::for_device(options, &be))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<W: WithBackend>(_: W, _: &ComputeOptions, _: bool) -> Result<W::Output> {
    bail!("--device cuda: this binary was built without the `cuda` feature; rebuild with `cargo build --release --features cuda`, or use --device cpu")
}

/// How a checkpoint is read, beyond what it says itself.
#[derive(Args, Debug, Clone, Default)]
pub struct ImportFlags {
    /// Attention heads of an imported file that does not say them: a bare
    /// timm, Hugging Face or torchvision file of another shape than
    /// torchvision's five (a hub folder's config.json says them, and so do
    /// the engine's files). Without it: width / 64, announced on stderr
    /// and recorded as guessed.
    #[arg(long)]
    pub heads: Option<usize>,
    /// The MLP's activation of an imported file that does not say it
    /// (gelu, gelu-tanh or quick-gelu): a bare CLIP file, whose library
    /// makes both GELU and QuickGELU models (OpenAI's weights: quick-gelu).
    /// A hub folder's config.json says it, torchvision's is gelu, and so
    /// do the engine's files. Without it: the library's default for the
    /// family, announced on stderr where that is a guess, and recorded.
    #[arg(long, value_name = "ACT", value_parser = parse_act)]
    pub act: Option<Activation>,
    /// Run the checkpoint at this input size (pixels, a multiple of its
    /// patch): its position embedding is resampled as timm's
    /// resample_abs_pos_embed does (bicubic, antialiased, class token
    /// kept), and the images are prepared at this size. Recorded.
    /// Default: the size it was trained at.
    #[arg(long, value_name = "N")]
    pub input_size: Option<usize>,
}

impl ImportFlags {
    pub fn options(&self) -> ImportOptions {
        ImportOptions {
            heads: self.heads,
            act: self.act,
            new_classes: None,
            input_size: self.input_size,
        }
    }
}

/// `--act`: the engine's name of an activation (`Activation::name`).
pub fn parse_act(name: &str) -> Result<Activation, String> {
    [
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::QuickGelu,
    ]
    .into_iter()
    .find(|a| a.name() == name)
    .ok_or_else(|| {
        format!("{name:?} is not an activation the engine computes: gelu, gelu-tanh or quick-gelu")
    })
}

/// The data set and how images are prepared. Each flag not given takes the
/// value the model's checkpoint recorded (its run's data), else the
/// default shown.
#[derive(Args, Debug, Clone)]
pub struct DataFlags {
    /// `demo` (built in, generated from a seed), a CIFAR-10/100 folder
    /// (binary, or torchvision's python pickles), a Hugging Face parquet
    /// folder (data/train-*.parquet, data/test-*.parquet), or an image-folder
    /// root with train/ and test/ (one sub-folder per class). Default: the
    /// data the checkpoint recorded (eval), else demo.
    #[arg(long)]
    pub data: Option<String>,
    /// Per-channel normalization: cifar, imagenet, half (mean = std = 0.5)
    /// or clip (OpenAI CLIP's statistics).
    /// Default: the checkpoint's (the teacher's for a new student), else
    /// cifar for CIFAR, half otherwise.
    #[arg(long)]
    pub normalize: Option<Normalize>,
    /// Resize the images to N x N (bilinear) and keep the center square of
    /// the model's input size (torchvision's Resize(N) + CenterCrop; the
    /// reference protocol: 256 for a 224 px model). Default: the
    /// checkpoint's (the teacher's for a new student), else straight to the
    /// input size.
    #[arg(long, value_name = "N")]
    pub resize: Option<usize>,
    /// Skip unreadable images in image folders (counted) instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Side at which an image folder's or parquet data's images are decoded and stored
    /// (resized once at load; the model's input resize happens per batch).
    /// Default: the size the run recorded, else what the model needs (its
    /// --resize, else its input size); a smaller size warns.
    #[arg(long, value_name = "N")]
    pub image_size: Option<usize>,
    /// Memory for decoded images, in GiB (fractions allowed): image folders
    /// and parquet data larger than this decoded are streamed, decoded per
    /// batch by threads working ahead of the model, with the same results. Default: half the
    /// memory available at start (MemAvailable), 4 GiB where unknown.
    #[arg(long, value_name = "GIB", value_parser = positive_gib)]
    pub data_memory: Option<f64>,
    /// Training images of the demo data (the test split gets a quarter as
    /// many) [default: 4000].
    #[arg(long)]
    pub demo_images: Option<usize>,
    /// Parquet data: the image column, a struct {bytes, path} as datasets
    /// writes an Image [default: the struct column with a bytes field].
    #[arg(long, value_name = "NAME")]
    pub image_column: Option<String>,
    /// Parquet data: the int label column [default: label, labels or
    /// fine_label, else the only ClassLabel].
    #[arg(long, value_name = "NAME")]
    pub label_column: Option<String>,
}

fn positive_gib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a positive number of GiB")),
    }
}

/// How the learning rate moves after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Schedule {
    /// Cosine decay from --lr to --min-lr.
    Cosine,
    /// --lr until the end (the reference protocol: no schedule).
    Constant,
}

/// Optimization settings shared by train, distill and sweep.
#[derive(Args, Debug, Clone)]
pub struct TrainFlags {
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Images per optimizer step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Learning-rate schedule after the warm-up: cosine (decay to
    /// --min-lr) or constant (--lr throughout).
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub schedule: Schedule,
    /// Final learning rate of the cosine schedule.
    #[arg(long, default_value_t = 1e-5)]
    pub min_lr: f32,
    /// Decoupled weight decay (weight matrices only).
    #[arg(long, default_value_t = 0.01)]
    pub wd: f32,
    /// Linear warm-up length, in epochs (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f32,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// Seed of initialization, batch order and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random-crop padding in pixels (0 turns cropping off).
    #[arg(long, default_value_t = 2)]
    pub crop_padding: usize,
    /// Turn off random horizontal flips.
    #[arg(long)]
    pub no_flip: bool,
    /// Evaluate on the test set only after the last epoch.
    #[arg(long)]
    pub eval_last_only: bool,
    /// Gradient accumulation: compute each batch as N micro-batches whose
    /// gradients are added before one optimizer step (the same step as the
    /// whole batch, up to rounding, with a micro-batch's activations), or
    /// `auto`: the fewest micro-batches whose memory plan fits.
    #[arg(long, default_value = "1")]
    pub accumulate: Accumulate,
}

/// `--accumulate N|auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    MicroBatches(usize),
    Auto,
}

impl std::str::FromStr for Accumulate {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Accumulate::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Accumulate::MicroBatches(n)),
                _ => bail!(
                    "--accumulate takes a number of micro-batches (1 or more) or auto, not '{s}'"
                ),
            },
        }
    }
}

/// What bounds a run's memory, and whether to stop after planning it.
#[derive(Args, Debug, Clone, Default)]
pub struct MemoryFlags {
    /// Print the memory plan (every buffer the run would allocate, in
    /// bytes) and what the machine has, then exit without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Host memory the run may use, e.g. 8G or 512MiB [default: what the
    /// operating system says is available, within the cgroup's limit].
    #[arg(long, value_parser = effrank_engine::memory::parse_size)]
    pub memory_limit: Option<u64>,
    /// Also check the plan against the GPU's free memory (from the
    /// driver). Off by default: the GPU side of the plan has not yet been
    /// checked against a GPU's allocations (host memory is always checked).
    #[arg(long)]
    pub check_gpu_memory: bool,
}

impl TrainFlags {
    /// A batch larger than the training set is cut to the training set,
    /// with a warning, so that no step allocates for images that do not
    /// exist; the run records the batch it used.
    pub fn fit_batch_to(&mut self, train_images: usize) {
        if self.batch > train_images {
            eprintln!(
                "warning: --batch {} is larger than the training set ({train_images} images); using --batch {train_images}",
                self.batch
            );
            self.batch = train_images;
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if self.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if let Accumulate::MicroBatches(n) = self.accumulate {
            if n > self.batch {
                bail!(
                    "--accumulate {n}: a batch of {} images splits into at most {} micro-batches",
                    self.batch,
                    self.batch
                );
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if self.wd.is_nan() || self.wd < 0.0 {
            bail!("--wd must be non-negative, got {}", self.wd);
        }
        Ok(())
    }

    pub fn augment(&self) -> Augment {
        Augment {
            flip: !self.no_flip,
            pad: self.crop_padding,
        }
    }

    pub fn optimizer(&self) -> AdamWConfig {
        AdamWConfig {
            weight_decay: self.wd,
            max_grad_norm: (self.clip > 0.0).then_some(self.clip),
            ..AdamWConfig::default()
        }
    }

    /// The learning rate the schedule ends at: a constant schedule is the
    /// cosine one with its floor at its peak.
    fn floor_lr(&self) -> f32 {
        match self.schedule {
            Schedule::Cosine => self.min_lr.min(self.lr),
            Schedule::Constant => self.lr,
        }
    }

    pub fn fit_options(&self, label: &str, quiet: bool) -> FitOptions {
        FitOptions {
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            min_lr: self.floor_lr(),
            warmup_epochs: self.warmup,
            seed: self.seed,
            augment: self.augment(),
            eval_every_epoch: !self.eval_last_only,
            micro_batches: match self.accumulate {
                Accumulate::MicroBatches(n) => n,
                // Resolved from the memory plan (`cli::memory`) before use.
                Accumulate::Auto => 1,
            },
            quiet,
            label: label.to_string(),
        }
    }
}

/// The distillation objective.
#[derive(Args, Debug, Clone)]
pub struct LossFlags {
    /// kd (Hinton KD mixed with CE by --alpha), feature (MSE + 1 − cos of
    /// every block's attention and MLP output and the logits), ce (labels
    /// only), or a weighted sum such as kd=1,feature=0.5.
    #[arg(long, default_value = "kd")]
    pub loss: String,
    /// KD temperature T (the KD term is scaled by T²).
    #[arg(long, default_value_t = 4.0)]
    pub temperature: f32,
    /// Share of KD in the kd loss: (1 − α)·CE + α·KD.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f32,
    /// Label smoothing of every cross-entropy term.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
}

impl LossFlags {
    pub fn spec(&self) -> Result<effrank_engine::train::LossSpec> {
        effrank_engine::train::LossSpec::parse(
            &self.loss,
            self.alpha,
            self.temperature,
            self.label_smoothing,
        )
    }
}

/// How a student is made from the teacher (factorize, distill, sweep).
#[derive(Args, Debug, Clone)]
pub struct FactorFlags {
    /// Factor initialization: svd (truncated SVD of W, U = U_r S^½, V =
    /// S^½ V_rᵀ), svd-act (truncated SVD of W C^½, C the second moment of
    /// the layer's inputs over --calibration training images, mapped back),
    /// or random (fresh factors).
    #[arg(long, default_value = "svd")]
    pub init: FactorInit,
    /// Training images (the first N, un-augmented, through the teacher on
    /// the CPU) whose activations calibrate --init svd-act.
    #[arg(long, default_value_t = DEFAULT_CALIBRATION, value_name = "N")]
    pub calibration: usize,
    /// Projections to factorize, comma-separated: q, k, v, proj, fc1, fc2,
    /// attn (q,k,v,proj), mlp (fc1,fc2), all. The others stay dense.
    #[arg(long, default_value = "all", value_name = "LAYERS")]
    pub layers: LayerSet,
    /// Blocks to factorize: A-B (inclusive, 0-based) or one index A
    /// [default: every block].
    #[arg(long, value_name = "A-B")]
    pub blocks: Option<BlockRange>,
    /// What a student takes from the teacher besides its factors: all
    /// (every tensor not factorized) or embeddings (patch embedding, class
    /// token, position embedding, final LayerNorm; blocks and head fresh,
    /// as the reference protocol's students).
    #[arg(long, value_enum, default_value_t = FromTeacher::All)]
    pub from_teacher: FromTeacher,
}

impl FactorFlags {
    /// The plan these flags describe; random factors and fresh tensors draw
    /// from `seed`.
    pub fn plan(&self, seed: u64) -> Result<StudentPlan> {
        let init = match self.init {
            FactorInit::SvdAct { .. } if self.calibration == 0 => {
                bail!("--calibration must be at least 1 image")
            }
            FactorInit::SvdAct { .. } => FactorInit::SvdAct {
                calibration: self.calibration,
            },
            other => other.with_seed(seed),
        };
        Ok(StudentPlan {
            init,
            targets: Targets {
                layers: self.layers,
                blocks: self.blocks,
            },
            from_teacher: self.from_teacher,
        })
    }
}

/// The smallest and largest rank a budget allocation gives a layer
/// (`factorize --budget`, `sweep --budgets`).
#[derive(Args, Debug, Clone)]
pub struct RankBoundFlags {
    /// Smallest rank a budget gives a layer.
    #[arg(long, default_value_t = 1)]
    pub floor: usize,
    /// Largest rank a budget gives a layer (default: its full rank).
    #[arg(long)]
    pub ceiling: Option<usize>,
}

impl RankBoundFlags {
    pub fn bounds(&self) -> effrank_engine::factorize::budget::RankBounds {
        effrank_engine::factorize::budget::RankBounds {
            floor: self.floor,
            ceiling: self.ceiling,
        }
    }
}
