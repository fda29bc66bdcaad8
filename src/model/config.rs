//! ViT shape: presets, flags and JSON files all end here.
//!
//! A ViT with `image_size` square inputs cut into `patch` x `patch` patches has
//! `n_patches = (image_size/patch)^2` patch tokens plus one class token, a
//! residual stream of `width`, `depth` pre-norm blocks of `heads` heads and an
//! MLP of `mlp` hidden units, and a linear head over `classes`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub channels: usize,
    pub patch: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    pub classes: usize,
    /// LayerNorm epsilon (timm and torchvision 1e-6, Hugging Face 1e-12).
    #[serde(default = "default_ln_eps")]
    pub ln_eps: f32,
}

fn default_ln_eps() -> f32 {
    1e-6
}

/// Largest value of any one shape field.
pub const MAX_DIM: usize = 1 << 20;
/// Largest count derived from a shape (tokens × width, parameters): far
/// beyond any model that fits a machine, far below an overflow.
pub const MAX_SIZE: u128 = 1 << 40;

/// The named presets, for `--model` and `--help`.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "vit-b32",
        "ViT-B/32: 224 px, patch 32, width 768, depth 12, 12 heads, MLP 3072",
    ),
    (
        "vit-s32",
        "ViT-S/32: 224 px, patch 32, width 384, depth 12, 6 heads, MLP 1536",
    ),
    (
        "vit-cifar",
        "CIFAR-native: 32 px, patch 4, width 192, depth 6, 3 heads, MLP 768",
    ),
    (
        "vit-demo",
        "the built-in demo's: 16 px, patch 4, width 64, depth 2, 2 heads, MLP 128",
    ),
];

impl VitConfig {
    /// A preset by name, with `classes` output classes.
    pub fn preset(name: &str, classes: usize) -> Result<Self> {
        let (image_size, patch, width, depth, heads, mlp) = match name {
            "vit-b32" => (224, 32, 768, 12, 12, 3072),
            "vit-s32" => (224, 32, 384, 12, 6, 1536),
            "vit-cifar" => (32, 4, 192, 6, 3, 768),
            "vit-demo" => (16, 4, 64, 2, 2, 128),
            other => {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
                bail!(
                    "unknown model preset '{other}'; known presets: {}, or a JSON file",
                    names.join(", ")
                )
            }
        };
        let cfg = VitConfig {
            image_size,
            channels: 3,
            patch,
            width,
            depth,
            heads,
            mlp,
            classes,
            ln_eps: 1e-6,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A preset name, or the path of a JSON file holding a `VitConfig`.
    pub fn from_name_or_file(name: &str, classes: usize) -> Result<Self> {
        if name.ends_with(".json") || std::path::Path::new(name).is_file() {
            let text = std::fs::read_to_string(name)
                .with_context(|| format!("reading model config {name}"))?;
            let cfg: VitConfig = serde_json::from_str(&text)
                .with_context(|| format!("parsing model config {name}"))?;
            cfg.validate()
                .with_context(|| format!("model config {name}"))?;
            return Ok(cfg);
        }
        Self::preset(name, classes)
    }

    /// Check that the shape is buildable, naming the field at fault: every
    /// field positive and at most `MAX_DIM`, the divisibilities, and sizes
    /// (tokens × width, parameters) small enough that no count overflows.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("image_size", self.image_size),
            ("channels", self.channels),
            ("patch", self.patch),
            ("width", self.width),
            ("depth", self.depth),
            ("heads", self.heads),
            ("mlp", self.mlp),
            ("classes", self.classes),
        ];
        for (name, v) in fields {
            if v == 0 {
                bail!("model config: {name} must be positive");
            }
            if v > MAX_DIM {
                bail!("model config: {name} = {v} is larger than {MAX_DIM}");
            }
        }
        if !self.image_size.is_multiple_of(self.patch) {
            bail!(
                "model config: image_size {} is not a multiple of patch {}",
                self.image_size,
                self.patch
            );
        }
        if !self.width.is_multiple_of(self.heads) {
            bail!(
                "model config: width {} is not a multiple of heads {}",
                self.width,
                self.heads
            );
        }
        if self.channels > 3 {
            bail!(
                "model config: channels {} > 3 is not supported",
                self.channels
            );
        }
        if self.ln_eps.is_nan() || self.ln_eps <= 0.0 || self.ln_eps.is_infinite() {
            bail!(
                "model config: ln_eps must be a positive number, got {}",
                self.ln_eps
            );
        }
        // Every count below is at most a product of three fields (< 2^60).
        let grid = (self.image_size / self.patch) as u128;
        let tokens = grid * grid + 1;
        let per_block =
            4 * (self.width as u128).pow(2) + 2 * (self.width as u128) * (self.mlp as u128);
        let params = per_block * self.depth as u128
            + (self.width * self.classes) as u128
            + tokens * self.width as u128;
        for (what, size) in [
            ("tokens x width", tokens * self.width as u128),
            ("parameters", params),
        ] {
            if size > MAX_SIZE {
                bail!("model config: {what} = {size} is larger than {MAX_SIZE}");
            }
        }
        Ok(())
    }

    pub fn n_patches(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }
    /// Patches plus the class token.
    pub fn tokens(&self) -> usize {
        self.n_patches() + 1
    }
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    /// Length of one flattened patch: channels * patch * patch.
    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch * self.patch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_token_counts() {
        let b = VitConfig::preset("vit-b32", 100).unwrap();
        assert_eq!(b.tokens(), 50);
        assert_eq!(b.head_dim(), 64);
        assert_eq!(VitConfig::preset("vit-cifar", 10).unwrap().tokens(), 65);
        assert!(VitConfig::preset("vit-x", 10).is_err());
    }

    #[test]
    fn bad_shapes_are_named() {
        let mut c = VitConfig::preset("vit-demo", 10).unwrap();
        c.patch = 5;
        assert!(c.validate().unwrap_err().to_string().contains("patch 5"));
        c.patch = 4;
        c.heads = 3;
        assert!(c.validate().unwrap_err().to_string().contains("heads 3"));
    }
}
