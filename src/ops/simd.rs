//! Elementwise CPU loops compiled for the vector unit they run on.
//!
//! The crate is built for baseline x86-64 so that one binary runs on any
//! x86-64 machine, which limits the compiler to SSE2: 4 floats per
//! instruction. `vectorized(|| loop)` runs the closure inside a function
//! compiled a second and third time with AVX-512 (16 floats per instruction)
//! and with AVX2 + FMA (8 floats), picked once at run time from what the CPU
//! reports. The closure must be `#[inline(always)]` and call only
//! `#[inline(always)]` helpers, so that its body is compiled inside the wide
//! function.
//!
//! Results do not depend on the level picked: Rust never contracts `a * b + c`
//! into an FMA or reorders float sums on its own, so the wide versions do the
//! same operations in the same order, only several lanes at a time.
//!
//! `--simd` fixes a narrower level, to pair them in one build
//! (`cargo bench --bench cpu`; the numbers are in `bench/`).

use crate::device::set_once;
use crate::options::SimdChoice;
use anyhow::{bail, Result};

/// Elements per rayon task in elementwise loops (64 KiB of f32): large
/// enough that a task's work dwarfs handing it to a thread.
pub const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// Runs `f` compiled for the widest vector instructions the CPU has.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: `level` checked that the CPU has these features.
            Level::Avx512 => return unsafe { with_avx512(f) },
            Level::Avx2 => return unsafe { with_avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}

/// The instruction sets `vectorized` chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2,
    Baseline,
}

static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();

/// What `vectorized` uses: the widest level this CPU has, unless
/// `choose` fixed a narrower one (`--simd`). Fixed once per process.
pub fn level() -> Level {
    *LEVEL.get_or_init(detect)
}

/// Fix the level for this process (`--simd`, `ops::configure_cpu`): an
/// error when the CPU lacks it, or when another level is already in use.
pub fn choose(choice: SimdChoice) -> Result<()> {
    let best = detect();
    let level = match choice {
        SimdChoice::Auto => best,
        SimdChoice::Baseline => Level::Baseline,
        SimdChoice::Avx2 if best != Level::Baseline => Level::Avx2,
        SimdChoice::Avx512 if best == Level::Avx512 => Level::Avx512,
        _ => bail!("--simd {choice:?}: this CPU has {best:?} at most"),
    };
    set_once(&LEVEL, level, "the CPU's vector level (--simd)")
}

/// The widest level this CPU supports.
fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512vl")
            && has!("avx512dq")
            && has!("avx512bw")
            && has!("avx2")
            && has!("fma")
        {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,avx")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `f` over the lanes, folded pairwise, halves first: `N/2 + N/4 + ... + 1`
/// operations, each level one vector instruction inside `vectorized`, where
/// a fold from one end is a chain of `N` dependent operations (floats do not
/// reassociate). The fixed order keeps results independent of the level and
/// the thread count. `N` is a power of two. Used by LayerNorm's row sums
/// and attention's row max, sum and dot.
#[inline(always)]
pub fn fold_pairwise<T: Copy, const N: usize>(mut lanes: [T; N], f: impl Fn(T, T) -> T) -> T {
    debug_assert!(N.is_power_of_two());
    let mut width = N / 2;
    while width > 0 {
        for l in 0..width {
            lanes[l] = f(lanes[l], lanes[l + width]);
        }
        width /= 2;
    }
    lanes[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wide and the baseline compilation of the same loop agree bit for
    /// bit (no contraction, no reordering), on inputs that exercise rounding.
    #[test]
    fn wide_and_baseline_loops_agree_bitwise() {
        let x: Vec<f32> = (0..10_001)
            .map(|i| ((i as f32) * 0.737).sin() * 3.0)
            .collect();
        #[inline(always)]
        fn body(x: &[f32]) -> Vec<f32> {
            x.iter()
                .map(|&v| v * 1.000_1 + v * v * 0.3 - crate::ops::gelu::cpu::gelu(v))
                .collect()
        }
        let wide = vectorized(
            #[inline(always)]
            || body(&x),
        );
        let base = body(&x);
        assert_eq!(wide.len(), base.len());
        for (i, (a, b)) in wide.iter().zip(&base).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "element {i}: wide {a} vs baseline {b} (level {:?})",
                level()
            );
        }
    }
}
