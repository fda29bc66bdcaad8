//! ViT shape: presets, flags and JSON files all end here.
//!
//! A ViT with `image_size` square inputs cut into `patch` x `patch` patches has
//! `n_patches = (image_size/patch)^2` patch tokens after its prefix tokens
//! (a class token, for most; `model::family`), a residual stream of
//! `width`, `depth` pre-norm blocks of `heads` heads and an MLP of `mlp`
//! hidden units, and a linear head over `classes`.

use super::family::{Family, Pool, PosEmbed};
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
    /// Prefix tokens, LayerScale, pooling, activation... (`model::family`);
    /// its fields sit beside the shape's in JSON, absent for a plain ViT.
    #[serde(flatten)]
    pub family: Family,
}

fn default_ln_eps() -> f32 {
    1e-6
}

/// Largest value of any one shape field.
pub const MAX_DIM: usize = 1 << 20;
/// Largest count derived from a shape (tokens × width, parameters): far
/// beyond any model that fits a machine, far below an overflow.
pub const MAX_SIZE: u128 = 1 << 40;

/// A named shape for `--model`.
#[derive(Clone, Copy, Debug)]
pub struct Preset {
    pub name: &'static str,
    /// What it is: the model family it matches.
    pub what: &'static str,
    pub image_size: usize,
    pub patch: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    pub ln_eps: f32,
    pub family: Family,
}

const fn preset(
    name: &'static str,
    what: &'static str,
    (image_size, patch, width, depth, heads, mlp): (usize, usize, usize, usize, usize, usize),
) -> Preset {
    Preset {
        name,
        what,
        image_size,
        patch,
        width,
        depth,
        heads,
        mlp,
        ln_eps: 1e-6,
        family: Family::PLAIN,
    }
}

/// `preset` of another family.
const fn of_family(p: Preset, family: Family, ln_eps: f32) -> Preset {
    Preset {
        family,
        ln_eps,
        ..p
    }
}

const DISTILLED: Family = Family {
    dist_token: true,
    pool: Pool::Distilled,
    ..Family::PLAIN
};
const DEIT3: Family = Family {
    pos_embed: PosEmbed::PatchesOnly,
    layer_scale: true,
    ..Family::PLAIN
};
const DINOV2: Family = Family {
    layer_scale: true,
    ..Family::PLAIN
};
const DINOV2_REG4: Family = Family {
    registers: 4,
    pos_embed: PosEmbed::PatchesOnly,
    layer_scale: true,
    ..Family::PLAIN
};
const CLIP: Family = Family {
    norm_pre: true,
    patch_bias: false,
    ..Family::PLAIN
};

/// The named presets: the plain ViT shapes of timm's `vit_*_patch*_224`,
/// torchvision's `vit_*` and the non-distilled DeiT (the same shapes), and
/// the engine's own small ones.
pub const PRESETS: &[Preset] = &[
    preset("vit-t16", "ViT-Ti/16", (224, 16, 192, 12, 3, 768)),
    preset("vit-s16", "ViT-S/16", (224, 16, 384, 12, 6, 1536)),
    preset("vit-s32", "ViT-S/32", (224, 32, 384, 12, 6, 1536)),
    preset("vit-b16", "ViT-B/16", (224, 16, 768, 12, 12, 3072)),
    preset("vit-b32", "ViT-B/32", (224, 32, 768, 12, 12, 3072)),
    preset("vit-l16", "ViT-L/16", (224, 16, 1024, 24, 16, 4096)),
    preset("vit-l32", "ViT-L/32", (224, 32, 1024, 24, 16, 4096)),
    preset("vit-h14", "ViT-H/14", (224, 14, 1280, 32, 16, 5120)),
    preset(
        "deit-t16",
        "DeiT-Ti/16 (no distillation token)",
        (224, 16, 192, 12, 3, 768),
    ),
    preset(
        "deit-s16",
        "DeiT-S/16 (no distillation token)",
        (224, 16, 384, 12, 6, 1536),
    ),
    preset(
        "deit-b16",
        "DeiT-B/16 (no distillation token)",
        (224, 16, 768, 12, 12, 3072),
    ),
    of_family(
        preset(
            "deit-t16-distilled",
            "DeiT-Ti/16 distilled",
            (224, 16, 192, 12, 3, 768),
        ),
        DISTILLED,
        1e-6,
    ),
    of_family(
        preset(
            "deit-s16-distilled",
            "DeiT-S/16 distilled",
            (224, 16, 384, 12, 6, 1536),
        ),
        DISTILLED,
        1e-6,
    ),
    of_family(
        preset(
            "deit-b16-distilled",
            "DeiT-B/16 distilled",
            (224, 16, 768, 12, 12, 3072),
        ),
        DISTILLED,
        1e-6,
    ),
    of_family(
        preset("deit3-s16", "DeiT-III-S/16", (224, 16, 384, 12, 6, 1536)),
        DEIT3,
        1e-6,
    ),
    of_family(
        preset("deit3-b16", "DeiT-III-B/16", (224, 16, 768, 12, 12, 3072)),
        DEIT3,
        1e-6,
    ),
    of_family(
        preset(
            "dinov2-s14",
            "DINOv2-S/14 (at 224 px)",
            (224, 14, 384, 12, 6, 1536),
        ),
        DINOV2,
        1e-6,
    ),
    of_family(
        preset(
            "dinov2-b14",
            "DINOv2-B/14 (at 224 px)",
            (224, 14, 768, 12, 12, 3072),
        ),
        DINOV2,
        1e-6,
    ),
    of_family(
        preset(
            "dinov2-s14-reg4",
            "DINOv2-S/14 with 4 registers (at 224 px)",
            (224, 14, 384, 12, 6, 1536),
        ),
        DINOV2_REG4,
        1e-6,
    ),
    of_family(
        preset(
            "clip-b32",
            "CLIP ViT-B/32 image tower",
            (224, 32, 768, 12, 12, 3072),
        ),
        CLIP,
        1e-5,
    ),
    of_family(
        preset(
            "clip-b16",
            "CLIP ViT-B/16 image tower",
            (224, 16, 768, 12, 12, 3072),
        ),
        CLIP,
        1e-5,
    ),
    preset("vit-cifar", "CIFAR-native", (32, 4, 192, 6, 3, 768)),
    preset("vit-demo", "the built-in demo's", (16, 4, 64, 2, 2, 128)),
];

impl Preset {
    /// "ViT-B/32: 224 px, patch 32, width 768, depth 12, 12 heads, MLP 3072".
    pub fn describe(&self) -> String {
        let family = if self.family.is_plain() {
            String::new()
        } else {
            format!("; {}", self.family.describe())
        };
        format!(
            "{}: {} px, patch {}, width {}, depth {}, {} heads, MLP {}{family}",
            self.what, self.image_size, self.patch, self.width, self.depth, self.heads, self.mlp
        )
    }
}

impl VitConfig {
    /// A preset by name, with `classes` output classes.
    pub fn preset(name: &str, classes: usize) -> Result<Self> {
        let Some(&Preset {
            image_size,
            patch,
            width,
            depth,
            heads,
            mlp,
            ln_eps,
            family,
            ..
        }) = PRESETS.iter().find(|p| p.name == name)
        else {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            bail!(
                "unknown model preset '{name}'; known presets: {}, or a JSON file",
                names.join(", ")
            )
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
            ln_eps,
            family,
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
        self.family.validate()?;
        // Every count below is at most a product of three fields (< 2^60).
        let grid = (self.image_size / self.patch) as u128;
        let tokens = grid * grid + self.family.prefix_tokens() as u128;
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
    /// Patches plus the prefix tokens (the class token, for most).
    pub fn tokens(&self) -> usize {
        self.n_patches() + self.family.prefix_tokens()
    }
    /// Prefix tokens in front of the patches.
    pub fn prefix(&self) -> usize {
        self.family.prefix_tokens()
    }
    /// Rows of the position embedding: every token's, or the patches'.
    pub fn pos_rows(&self) -> usize {
        match self.family.pos_embed {
            PosEmbed::AllTokens => self.tokens(),
            PosEmbed::PatchesOnly => self.n_patches(),
        }
    }
    /// The first token the position embedding is added to.
    pub fn pos_from(&self) -> usize {
        self.tokens() - self.pos_rows()
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
    use crate::model::params::{dense_ranks, param_count};

    /// Every preset's parameter count by hand (patch embedding, prefix
    /// tokens and position embedding, per block two LayerNorms, qkv, proj,
    /// fc1 and fc2 with biases and LayerScale, final LayerNorm, heads), and
    /// against the counts timm reports for its models of the same shape
    /// with 1000 classes.
    #[test]
    fn preset_parameter_counts_match_a_hand_count_and_timm() {
        for p in PRESETS {
            let c = VitConfig::preset(p.name, 1000).unwrap();
            let (d, m, pp, f) = (c.width, c.mlp, c.patch * c.patch, c.family);
            let ls = if f.layer_scale { 2 * d } else { 0 };
            let block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d) + ls;
            let prefix = 1 + usize::from(f.dist_token) + f.registers;
            let pos = if f.pos_embed == PosEmbed::AllTokens {
                prefix + c.n_patches()
            } else {
                c.n_patches()
            };
            let heads = if f.pool == Pool::Distilled { 2 } else { 1 };
            let hand = (3 * pp * d + usize::from(f.patch_bias) * d)
                + prefix * d
                + pos * d
                + usize::from(f.norm_pre) * 2 * d
                + c.depth * block
                + 2 * d
                + heads * (d * 1000 + 1000);
            assert_eq!(param_count(&c, &dense_ranks(&c)), hand, "{}", p.name);
        }
        // timm: sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters()).
        for (name, timm) in [
            ("vit-t16", 5_717_416),             // vit_tiny_patch16_224
            ("vit-s16", 22_050_664),            // vit_small_patch16_224
            ("vit-b16", 86_567_656),            // vit_base_patch16_224
            ("vit-b32", 88_224_232),            // vit_base_patch32_224
            ("vit-l16", 304_326_632),           // vit_large_patch16_224
            ("deit-s16", 22_050_664),           // deit_small_patch16_224
            ("deit-t16-distilled", 5_910_800),  // deit_tiny_distilled_patch16_224
            ("deit-s16-distilled", 22_436_432), // deit_small_distilled_patch16_224
            ("deit3-s16", 22_059_496),          // deit3_small_patch16_224
            ("dinov2-s14", 22_013_800),         // vit_small_patch14_dinov2, img_size=224
            ("dinov2-s14-reg4", 22_014_952),    // vit_small_patch14_reg4_dinov2, img_size=224
            ("clip-b32", 88_225_000),           // vit_base_patch32_clip_224
        ] {
            let c = VitConfig::preset(name, 1000).unwrap();
            assert_eq!(param_count(&c, &dense_ranks(&c)), timm, "{name}");
        }
    }

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
