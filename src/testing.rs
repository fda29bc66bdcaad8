//! Helpers shared by the tests: random inputs, a central finite-difference
//! check, and the cross-device comparison that every op folder uses to run
//! one test body on every device (candle's `test_device!` idea).
//!
//! Finite differences perturb one input at a time by ±h and compare
//! `(L(x+h) − L(x−h)) / 2h` with the analytic gradient. Ops run in fp32; the
//! objective is summed in f64. With h = 1e-2 and inputs of order 1 the
//! truncation error (h²·f'''/6 ≈ 1e-5) and the rounding error
//! (ε_f32·|L|/h ≈ 1e-5·|L|) stay far below the 1% tolerance, while a wrong
//! or missing term moves a gradient by far more.
//!
//! Cross-device checks: `on_every_device!(body)` writes one `#[test]` per
//! device for `fn body<D: Backend>(dev: &D)`: `cpu`, and with the `cuda`
//! feature `cuda_fp32` and `cuda_bf16` on the default paths, and
//! `cuda_fp32_new_paths` and `cuda_bf16_new_paths` with every path that is
//! off by default switched on (`CudaOptions::short_attention`; a model
//! test also sets `ModelPaths` on, `every_path`), all ignored without a
//! GPU (run them with `--include-ignored`). The environment does not
//! change which paths a test runs. Inside the body, `on_both!` runs the same code
//! on the CPU reference and on `dev` and returns both sets of buffers, which
//! `assert_close` compares with the tolerance of the device's precision
//! (`tol`). On the CPU the comparison is against itself, so it checks that
//! the op is deterministic and that the body's shapes pass the op's checks.

use crate::device::{BufKind, Device, Precision};
use crate::rng::Rng;

/// Elementwise operations in fp32.
pub const EW: f32 = 1e-5;
/// Long reductions, which a GPU sums in another order.
pub const RED: f32 = 1e-4;
/// Anything stored in bf16 (8 significant bits).
pub const BF16: f32 = 1e-2;

pub fn random(n: usize, seed: u64) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, 1.0)
}

pub fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    Rng::new(seed).normal_vec(n, std)
}

/// `Σ w·out` in f64: the scalar objective whose gradient w.r.t. `out` is `w`.
pub fn dot(w: &[f32], out: &[f32]) -> f64 {
    w.iter().zip(out).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// `max |a − b| / max |b|`: the error of a result against a reference
/// (another library's logits), relative to the reference's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths of result and reference");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Every tensor of a safetensors reference file (inputs and outputs a
/// script wrote) as f32, by name.
pub fn f32_tensors(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
    st.tensors()
        .into_iter()
        .map(|(name, v)| (name, bytemuck::pod_collect_to_vec::<u8, f32>(v.data())))
        .collect()
}

/// The logits of a checkpoint's model on the CPU for `images` (`[n, C, H,
/// W]` at its input size).
pub fn cpu_logits(ck: &crate::model::checkpoint::Checkpoint, images: &[f32]) -> Vec<f32> {
    let be = crate::device::Cpu;
    let c = &ck.cfg;
    let n = images.len() / (c.channels * c.image_size * c.image_size);
    let paths = crate::options::ModelPaths::default_of(&be);
    let model = crate::model::Vit::from_host(&be, c, &ck.ranks, &ck.params, paths)
        .expect("a model of a valid checkpoint");
    let mut acts = model.new_acts(&be, n).expect("activations");
    be.write(&mut acts.images, images).expect("images");
    model.forward(&be, &mut acts, n).expect("forward");
    be.download(&acts.logits).expect("logits")
}

/// Compare `analytic` with central differences of `loss` at `x`, on up to
/// `samples` coordinates chosen at random.
pub fn fd_check(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    samples: usize,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-2f32;
    let mut rng = Rng::new(99);
    let mut p = x.to_vec();
    for _ in 0..samples.min(x.len()) {
        let i = rng.below(x.len());
        p[i] = x[i] + h;
        let up = loss(&p);
        p[i] = x[i] - h;
        let down = loss(&p);
        p[i] = x[i];
        let numeric = (up - down) / (2.0 * h as f64);
        let a = analytic[i] as f64;
        let tol = 1e-2 * numeric.abs().max(a.abs()) + 1e-3;
        assert!(
            (numeric - a).abs() <= tol,
            "{name}[{i}]: analytic {a}, finite difference {numeric}"
        );
    }
}

/// Calls `call` with buffers of the lengths `lens` (filled with `fill`),
/// once with each of them one element short and once with none short:
/// only the last call may succeed (an op's shape checks, argument by
/// argument; `what` names the entry point in the message).
pub fn each_buffer_short(
    what: &str,
    lens: &[usize],
    fill: f32,
    mut call: impl FnMut(&mut [Vec<f32>]) -> anyhow::Result<()>,
) {
    for short in 0..=lens.len() {
        let mut bufs: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| vec![fill; if i == short { l - 1 } else { l }])
            .collect();
        let res = call(&mut bufs);
        assert_eq!(
            res.is_ok(),
            short == lens.len(),
            "{what} with argument {short} short"
        );
    }
}

/// The tolerance of a check: `fp32` at fp32, `BF16` at bf16.
pub fn tol(p: Precision, fp32: f32) -> f32 {
    match p {
        Precision::F32 => fp32,
        Precision::Bf16 => BF16,
    }
}

/// An input of a cross-device check, with the kind the model would allocate it as.
pub fn act(v: Vec<f32>) -> (BufKind, Vec<f32>) {
    (BufKind::Activation, v)
}
pub fn par(v: Vec<f32>) -> (BufKind, Vec<f32>) {
    (BufKind::Param, v)
}
pub fn stat(v: Vec<f32>) -> (BufKind, Vec<f32>) {
    (BufKind::Statistic, v)
}

/// On a bf16 device, activation inputs rounded to bf16 for both devices,
/// so the comparison measures the device's arithmetic, not the input rounding.
pub fn rounded<D: Device>(dev: &D, inputs: Vec<(BufKind, Vec<f32>)>) -> Vec<(BufKind, Vec<f32>)> {
    if dev.precision() == Precision::F32 {
        return inputs;
    }
    inputs
        .into_iter()
        .map(|(k, v)| {
            if k == BufKind::Activation {
                (
                    k,
                    v.into_iter()
                        .map(|x| half::bf16::from_f32(x).to_f32())
                        .collect(),
                )
            } else {
                (k, v)
            }
        })
        .collect()
}

/// Panics naming the buffer when `max |got − want| > tol · max |want|`;
/// prints the largest relative error.
pub fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32) {
    assert_close_floor(what, got, want, tol, 0.0)
}

/// As `assert_close`, with the scale of a buffer at least `floor` times the
/// largest value of all buffers (for buffers that are zero up to rounding,
/// such as the key bias gradient, which softmax's shift invariance makes 0).
pub fn assert_close_floor(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tol: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: buffer count");
    let global = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: buffer {i} length");
        let scale = w
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(floor * global)
            .max(1e-20);
        let (at, err) = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold((0, 0f32), |(bi, be), (j, e)| {
                if e > be || e.is_nan() {
                    (j, e)
                } else {
                    (bi, be)
                }
            });
        let finite_alike = g.iter().all(|v| v.is_finite()) == w.iter().all(|v| v.is_finite());
        assert!(err <= tol * scale && finite_alike, "{what}: buffer {i}: max error {err:e} at {at} (device {}, cpu {}), scale {scale:e}, tolerance {tol:e}", g[at], w[at]);
        worst = worst.max(err / scale);
    }
    println!("{what}: max relative error {worst:.2e} (tolerance {tol:.0e})");
}

/// CUDA device 0 at precision `p` on the default paths, whatever the
/// environment says (tests that call this are ignored without a GPU).
#[cfg(feature = "cuda")]
pub fn cuda(p: Precision) -> crate::device::Cuda {
    crate::device::Cuda::with_options(0, p, Default::default()).expect("CUDA device 0")
}

/// CUDA device 0 at precision `p` with every path that is off by default on.
#[cfg(feature = "cuda")]
pub fn cuda_new_paths(p: Precision) -> crate::device::Cuda {
    let options = crate::device::cuda::CudaOptions {
        short_attention: true,
        profile: false,
    };
    crate::device::Cuda::with_options(0, p, options).expect("CUDA device 0")
}

/// Runs `body` on the CPU reference and on `dev`, each with its own copy
/// of `inputs` (rounded as `rounded` says) bound to the names in brackets,
/// and returns `(cpu, dev)`: every buffer downloaded after the body.
#[macro_export]
macro_rules! on_both {
    ($dev:expr, $inputs:expr, |$be:ident, [$($b:ident),*]| $body:block) => {{
        let inputs: Vec<($crate::device::BufKind, Vec<f32>)> = $crate::testing::rounded($dev, $inputs);
        let on_cpu = {
            let $be = &$crate::device::Cpu;
            let mut bufs: Vec<_> = inputs.iter().map(|(kind, h)| $crate::device::Device::upload($be, h, *kind).unwrap()).collect();
            {
                let [$($b),*] = bufs.as_mut_slice() else { unreachable!() };
                $body
            }
            bufs.iter().map(|b| $crate::device::Device::download($be, b).unwrap()).collect::<Vec<_>>()
        };
        let on_dev = {
            let $be = $dev;
            let mut bufs: Vec<_> = inputs.iter().map(|(kind, h)| $crate::device::Device::upload($be, h, *kind).unwrap()).collect();
            {
                let [$($b),*] = bufs.as_mut_slice() else { unreachable!() };
                $body
            }
            bufs.iter().map(|b| $crate::device::Device::download($be, b).unwrap()).collect::<Vec<_>>()
        };
        (on_cpu, on_dev)
    }};
}

/// One `#[test]` per device for the generic test body `fn $body<D>(dev: &D)`:
/// a module named like the body with tests `cpu`, `cuda_fp32`,
/// `cuda_bf16`, `cuda_fp32_new_paths` and `cuda_bf16_new_paths` (the CUDA
/// ones need the `cuda` feature and are ignored without a GPU).
#[macro_export]
macro_rules! on_every_device {
    ($body:ident) => {
        mod $body {
            #[test]
            fn cpu() {
                super::$body(&$crate::device::Cpu)
            }
            #[cfg(feature = "cuda")]
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn cuda_fp32() {
                super::$body(&$crate::testing::cuda($crate::device::Precision::F32))
            }
            #[cfg(feature = "cuda")]
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn cuda_bf16() {
                super::$body(&$crate::testing::cuda($crate::device::Precision::Bf16))
            }
            #[cfg(feature = "cuda")]
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn cuda_fp32_new_paths() {
                super::$body(&$crate::testing::cuda_new_paths(
                    $crate::device::Precision::F32,
                ))
            }
            #[cfg(feature = "cuda")]
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn cuda_bf16_new_paths() {
                super::$body(&$crate::testing::cuda_new_paths(
                    $crate::device::Precision::Bf16,
                ))
            }
        }
    };
}

/// The value of `f` run on rayon pools of 1, 2 and 4 threads (more threads
/// than cores too, so a machine of any size takes the parallel paths),
/// which must be the same: results may not depend on the thread count.
pub fn same_on_any_thread_count<T: PartialEq + std::fmt::Debug + Send>(
    what: &str,
    f: impl Fn() -> T + Sync,
) -> T {
    let run = |threads| {
        crate::device::cpu::thread_pool(threads)
            .expect("a test pool")
            .install(&f)
    };
    let one = run(1);
    for threads in [2, 4] {
        assert!(
            run(threads) == one,
            "{what}: {threads} threads give other bits than one thread"
        );
    }
    one
}
