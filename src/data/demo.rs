//! The built-in demo data set: small RGB images generated in code from a
//! seed, so the whole pipeline (train, factorize, distill, sweep, analyze)
//! runs in seconds with no files.
//!
//! Each of the 10 classes is a pattern with its own orientation, spatial
//! frequency and colour: oriented sinusoidal gratings, plaids (two crossed
//! gratings), and gratings carrying a bright or a dark spot. Every image draws
//! its own phase, orientation and frequency jitter, contrast, colour jitter,
//! background level and tint, spot position and size, and pixel noise. The
//! phase is uniform, so the class is invisible to a linear read-out of the
//! pixels (the mean image of a class is nearly flat); a network has to detect
//! oriented energy, which takes several directions at once, so a rank-r
//! bottleneck hurts at small r. Some classes are deliberately close pairs
//! (same colour, orientations 30 degrees apart; same orientation, frequencies
//! 4.5 vs 3.5 cycles; bright vs dark spot), so a small ViT learns the set well
//! above chance but not perfectly.
//!
//! Determinism: image `i` of a split is drawn from its own stream
//! `Rng::from_keys(&[DEMO_KEY, seed, split, i])` (training split 1, test split
//! 2, so the two are disjoint), and all arithmetic uses uniform draws and the
//! pure-Rust `libm`, so the same seed gives the same bytes on every machine
//! and any number of threads.

use super::Dataset;
use crate::rng::Rng;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::f32::consts::PI;

/// First key of every demo stream, keeping them apart from the augmentation
/// and shuffling streams that use the same seed.
const DEMO_KEY: u64 = 0xDE70_DA7A;
const TRAIN_SPLIT: u64 = 1;
const TEST_SPLIT: u64 = 2;

// How hard the demo is: per-image jitter of each class's pattern. Raising
// them lowers the accuracy a model can reach.
/// Standard deviation of the orientation jitter, degrees.
const ANGLE_JITTER_DEG: f32 = 7.0;
/// Standard deviation of the relative frequency jitter.
const FREQ_JITTER: f32 = 0.1;
/// Range of the pattern's amplitude (pixel values in [0, 1]).
const CONTRAST: (f32, f32) = (0.12, 0.32);
/// Standard deviation of the per-channel colour jitter.
const COLOUR_JITTER: f32 = 0.12;
/// Standard deviation of the per-pixel noise.
const NOISE: f32 = 0.06;

/// Size and seed of the demo data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoConfig {
    pub seed: u64,
    /// Side of the square images (16 matches the `vit-demo` preset).
    pub image_size: usize,
    pub train: usize,
    pub test: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            seed: 0,
            image_size: 16,
            train: 4000,
            test: 1000,
        }
    }
}

/// What the classes draw.
#[derive(Clone, Copy, Debug)]
enum Pattern {
    Grating,
    /// Two gratings at right angles, each with its own phase.
    Plaid,
    /// A grating plus a Gaussian spot of this sign (+1 bright, -1 dark).
    Spot(f32),
}

#[derive(Clone, Copy, Debug)]
struct ClassSpec {
    name: &'static str,
    /// Orientation of the grating's wave vector, degrees.
    angle: f32,
    /// Cycles across the image.
    freq: f32,
    colour: [f32; 3],
    pattern: Pattern,
}

const WARM: [f32; 3] = [0.95, 0.55, 0.15];
const COOL: [f32; 3] = [0.15, 0.55, 0.95];
const GREEN: [f32; 3] = [0.3, 0.9, 0.3];
const GREY: [f32; 3] = [0.7, 0.7, 0.7];
const MAGENTA: [f32; 3] = [0.85, 0.3, 0.85];

const CLASSES: [ClassSpec; 10] = [
    ClassSpec {
        name: "warm-0deg",
        angle: 0.0,
        freq: 2.0,
        colour: WARM,
        pattern: Pattern::Grating,
    },
    ClassSpec {
        name: "warm-90deg",
        angle: 90.0,
        freq: 2.0,
        colour: WARM,
        pattern: Pattern::Grating,
    },
    ClassSpec {
        name: "cool-45deg",
        angle: 45.0,
        freq: 3.0,
        colour: COOL,
        pattern: Pattern::Grating,
    },
    ClassSpec {
        name: "cool-75deg",
        angle: 75.0,
        freq: 3.0,
        colour: COOL,
        pattern: Pattern::Grating,
    },
    ClassSpec {
        name: "green-fine",
        angle: 120.0,
        freq: 4.5,
        colour: GREEN,
        pattern: Pattern::Grating,
    },
    ClassSpec {
        name: "green-coarse",
        angle: 120.0,
        freq: 3.5,
        colour: GREEN,
        pattern: Pattern::Grating,
    },
    ClassSpec {
        name: "grey-plaid",
        angle: 0.0,
        freq: 3.0,
        colour: GREY,
        pattern: Pattern::Plaid,
    },
    ClassSpec {
        name: "magenta-plaid",
        angle: 45.0,
        freq: 3.0,
        colour: MAGENTA,
        pattern: Pattern::Plaid,
    },
    ClassSpec {
        name: "bright-spot",
        angle: 150.0,
        freq: 2.5,
        colour: GREY,
        pattern: Pattern::Spot(1.0),
    },
    ClassSpec {
        name: "dark-spot",
        angle: 150.0,
        freq: 2.5,
        colour: GREY,
        pattern: Pattern::Spot(-1.0),
    },
];

/// Number of demo classes.
pub const N_CLASSES: usize = CLASSES.len();

/// The class names, by label.
pub fn class_names() -> Vec<String> {
    CLASSES.iter().map(|c| c.name.to_string()).collect()
}

/// The (train, test) demo data sets. Labels cycle through the classes, so
/// every class has `n / 10` images (the first `n % 10` classes one more).
pub fn generate(cfg: &DemoConfig) -> Result<(Dataset, Dataset)> {
    if cfg.image_size < 4 {
        bail!(
            "demo image size {} is too small; use at least 4 pixels",
            cfg.image_size
        );
    }
    if cfg.train == 0 || cfg.test == 0 {
        bail!(
            "demo data needs at least one training and one test image (asked for {} and {})",
            cfg.train,
            cfg.test
        );
    }
    Ok((
        split(cfg, TRAIN_SPLIT, cfg.train)?,
        split(cfg, TEST_SPLIT, cfg.test)?,
    ))
}

fn split(cfg: &DemoConfig, split: u64, n: usize) -> Result<Dataset> {
    let s = cfg.image_size;
    let mut images = vec![0u8; n * 3 * s * s];
    images
        .par_chunks_mut(3 * s * s)
        .enumerate()
        .for_each(|(i, out)| {
            let mut rng = Rng::from_keys(&[DEMO_KEY, cfg.seed, split, i as u64]);
            render(&CLASSES[i % N_CLASSES], &mut rng, s, out);
        });
    let labels = (0..n).map(|i| (i % N_CLASSES) as u32).collect();
    Dataset::new(images, labels, N_CLASSES, Some(class_names()), (3, s, s))
}

/// Uniform in [lo, hi).
fn uniform(rng: &mut Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.uniform() as f32
}

/// Roughly standard normal: the sum of three uniforms, rescaled (variance 1).
fn approx_normal(rng: &mut Rng) -> f32 {
    2.0 * (rng.uniform() + rng.uniform() + rng.uniform() - 1.5) as f32
}

/// One plane wave `cos(2 pi f (u cos a + v sin a) + phase)`.
#[derive(Clone, Copy)]
struct Wave {
    kx: f32,
    ky: f32,
    phase: f32,
}

impl Wave {
    fn new(angle_deg: f32, freq: f32, phase: f32) -> Self {
        let a = angle_deg * PI / 180.0;
        Wave {
            kx: 2.0 * PI * freq * libm::cosf(a),
            ky: 2.0 * PI * freq * libm::sinf(a),
            phase,
        }
    }

    fn at(&self, u: f32, v: f32) -> f32 {
        libm::cosf(self.kx * u + self.ky * v + self.phase)
    }
}

/// A Gaussian spot: centre, radius and signed amplitude.
#[derive(Clone, Copy)]
struct Spot {
    cx: f32,
    cy: f32,
    radius: f32,
    amp: f32,
}

/// The random draws of one image.
struct Draw {
    waves: Vec<Wave>,
    contrast: f32,
    colour: [f32; 3],
    background: [f32; 3],
    spot: Option<Spot>,
}

fn draw(spec: &ClassSpec, rng: &mut Rng) -> Draw {
    let angle = spec.angle + ANGLE_JITTER_DEG * approx_normal(rng);
    let freq = spec.freq * (1.0 + FREQ_JITTER * approx_normal(rng));
    let mut waves = vec![Wave::new(angle, freq, uniform(rng, 0.0, 2.0 * PI))];
    if let Pattern::Plaid = spec.pattern {
        waves.push(Wave::new(angle + 90.0, freq, uniform(rng, 0.0, 2.0 * PI)));
    }
    let contrast = uniform(rng, CONTRAST.0, CONTRAST.1);
    let colour = spec
        .colour
        .map(|c| (c + COLOUR_JITTER * approx_normal(rng)).clamp(0.0, 1.0));
    let level = uniform(rng, 0.35, 0.65);
    let background =
        std::array::from_fn(|c| level + uniform(rng, -0.06, 0.06) + 0.08 * (colour[c] - 0.5));
    let spot = match spec.pattern {
        Pattern::Spot(sign) => Some(Spot {
            cx: uniform(rng, -0.25, 0.25),
            cy: uniform(rng, -0.25, 0.25),
            radius: uniform(rng, 0.08, 0.14),
            amp: sign * uniform(rng, 0.15, 0.35),
        }),
        _ => None,
    };
    Draw {
        waves,
        contrast,
        colour,
        background,
        spot,
    }
}

/// Render one image of class `spec` into `out` (`[3, s, s]`).
fn render(spec: &ClassSpec, rng: &mut Rng, s: usize, out: &mut [u8]) {
    let d = draw(spec, rng);
    let scale = 1.0 / d.waves.len() as f32;
    for y in 0..s {
        for x in 0..s {
            let u = (x as f32 + 0.5) / s as f32 - 0.5;
            let v = (y as f32 + 0.5) / s as f32 - 0.5;
            let g = scale * d.waves.iter().map(|w| w.at(u, v)).sum::<f32>();
            let spot = d.spot.map_or(0.0, |p| {
                let r2 = (u - p.cx) * (u - p.cx) + (v - p.cy) * (v - p.cy);
                p.amp * libm::expf(-r2 / (2.0 * p.radius * p.radius))
            });
            for c in 0..3 {
                let value = d.background[c]
                    + d.contrast * d.colour[c] * g
                    + spot
                    + NOISE * approx_normal(rng);
                out[(c * s + y) * s + x] = (value * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_degenerate_configs() {
        let cfg = DemoConfig {
            image_size: 2,
            ..DemoConfig::default()
        };
        assert!(generate(&cfg)
            .unwrap_err()
            .to_string()
            .contains("too small"));
        let cfg = DemoConfig {
            test: 0,
            ..DemoConfig::default()
        };
        assert!(generate(&cfg)
            .unwrap_err()
            .to_string()
            .contains("at least one"));
    }

    #[test]
    fn approx_normal_has_unit_variance() {
        let mut rng = Rng::new(5);
        let x: Vec<f32> = (0..100_000).map(|_| approx_normal(&mut rng)).collect();
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / x.len() as f32;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "mean {mean} var {var}"
        );
    }
}
