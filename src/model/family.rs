//! What distinguishes the ViT families from one another, beyond their shape:
//! the tokens in front of the patches, where the position embedding goes,
//! which biases exist, LayerScale, the pooling and the activation.
//!
//! | family | prefix tokens | position embedding | differs in |
//! |---|---|---|---|
//! | ViT (timm `vit_*`, torchvision, HF `ViT*`), DeiT | class | all tokens | |
//! | DeiT distilled | class, distillation | all tokens | `Pool::Distilled` (HF's `DeiTForImageClassification`: `Pool::Class`) |
//! | DeiT-III | class | patches only | LayerScale |
//! | DINOv2 | class | all tokens | LayerScale |
//! | DINOv2 with registers | class, 4 registers | patches only | LayerScale |
//! | CLIP | class | all tokens | `norm_pre`, no patch bias, quick GELU (OpenAI) |
//! | average pooling (timm `global_pool='avg'`) | none or class | all tokens | `Pool::Average` |
//!
//! Token order is `[class][distillation][registers][patches]`, as timm and
//! Hugging Face lay them out. A block with LayerScale computes
//! `x + γ₁ ⊙ attn(LN1(x))` and `m + γ₂ ⊙ mlp(LN2(m))` (γ per channel).
//! Pooling reads the final residual stream:
//!
//! ```text
//! Class        logits = head(LN(x[0]))
//! Average      logits = head(LN(mean of the patch tokens))        (timm's fc_norm)
//! Distilled    logits = (head(LN(x[0])) + head_dist(LN(x[1]))) / 2 (DeiT at evaluation)
//! ClassAndMean y = LN(x) on every token;  logits = head([y[0] ; mean of y's patch tokens])
//!                                                                   (HF Dinov2ForImageClassification)
//! ```

use crate::ops::gelu::Activation;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which tokens the position embedding is added to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PosEmbed {
    /// Every token, prefix tokens included (timm's default, torchvision,
    /// Hugging Face ViT, DeiT, DINOv2, CLIP).
    #[default]
    AllTokens,
    /// The patch tokens only (timm's `no_embed_class`: DeiT-III, DINOv2 with
    /// registers).
    PatchesOnly,
}

/// How the final residual stream becomes the logits (module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pool {
    #[default]
    Class,
    Average,
    Distilled,
    ClassAndMean,
}

impl Pool {
    /// The name of the final LayerNorm's tensors: timm's `fc_norm` for
    /// average pooling, `norm` otherwise.
    pub fn norm_name(self) -> &'static str {
        match self {
            Pool::Average => "fc_norm",
            _ => "norm",
        }
    }

    /// The head's input width for a residual stream of `width`.
    pub fn head_inputs(self, width: usize) -> usize {
        match self {
            Pool::ClassAndMean => 2 * width,
            _ => width,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

/// The family's settings (module doc). Every field defaults to the plain
/// ViT, so a config that does not name them is one, and a plain model's
/// config is written without them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Family {
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub class_token: bool,
    /// DeiT's distillation token, right after the class token.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dist_token: bool,
    /// Register tokens (Darcet et al., 2024) after the class token.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub registers: usize,
    #[serde(default, skip_serializing_if = "is_default")]
    pub pos_embed: PosEmbed,
    /// The patch embedding has a bias (not CLIP's).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub patch_bias: bool,
    /// q, k and v have biases.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub qkv_bias: bool,
    /// A LayerNorm on the tokens before the first block (CLIP).
    #[serde(default, skip_serializing_if = "is_false")]
    pub norm_pre: bool,
    /// LayerScale on both sub-layers of every block.
    #[serde(default, skip_serializing_if = "is_false")]
    pub layer_scale: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool: Pool,
    /// The MLP's activation.
    #[serde(default, skip_serializing_if = "is_default")]
    pub act: Activation,
}

impl Default for Family {
    fn default() -> Self {
        Family::PLAIN
    }
}

impl Family {
    /// The plain ViT: a class token, the position embedding on every token,
    /// every bias, no LayerScale, class-token pooling, exact GELU.
    pub const PLAIN: Family = Family {
        class_token: true,
        dist_token: false,
        registers: 0,
        pos_embed: PosEmbed::AllTokens,
        patch_bias: true,
        qkv_bias: true,
        norm_pre: false,
        layer_scale: false,
        pool: Pool::Class,
        act: Activation::Gelu,
    };

    /// The plain ViT (every field at its default).
    pub fn is_plain(&self) -> bool {
        *self == Family::default()
    }

    /// Tokens in front of the patches.
    pub fn prefix_tokens(&self) -> usize {
        usize::from(self.class_token) + usize::from(self.dist_token) + self.registers
    }

    /// The distillation token's row (after the class token).
    pub fn dist_row(&self) -> usize {
        usize::from(self.class_token)
    }

    /// The first register token's row.
    pub fn register_row(&self) -> usize {
        usize::from(self.class_token) + usize::from(self.dist_token)
    }

    /// Only the class token's row reaches the head: the last block may run
    /// on it alone (the class-token tail, `model::vit`).
    pub fn pools_class_token_only(&self) -> bool {
        self.pool == Pool::Class
    }

    /// A contradiction between fields, named.
    pub fn validate(&self) -> Result<()> {
        match self.pool {
            Pool::Class | Pool::ClassAndMean if !self.class_token => {
                bail!(
                    "model config: pool {:?} reads the class token, but class_token is false",
                    self.pool
                )
            }
            Pool::Distilled if !(self.class_token && self.dist_token) => bail!(
                "model config: pool Distilled reads the class and distillation tokens; both class_token and dist_token must be true"
            ),
            _ => {}
        }
        if self.registers > 1024 {
            bail!(
                "model config: registers = {} is more than 1024",
                self.registers
            );
        }
        Ok(())
    }

    /// One line for summaries: "plain" or the fields that differ.
    pub fn describe(&self) -> String {
        if self.is_plain() {
            return "plain ViT".into();
        }
        let mut parts = vec![];
        if !self.class_token {
            parts.push("no class token".to_string());
        }
        if self.dist_token {
            parts.push("distillation token".into());
        }
        if self.registers > 0 {
            parts.push(format!("{} registers", self.registers));
        }
        if self.pos_embed == PosEmbed::PatchesOnly {
            parts.push("position embedding on patches only".into());
        }
        if !self.patch_bias {
            parts.push("no patch bias".into());
        }
        if !self.qkv_bias {
            parts.push("no qkv bias".into());
        }
        if self.norm_pre {
            parts.push("norm_pre".into());
        }
        if self.layer_scale {
            parts.push("LayerScale".into());
        }
        if self.pool != Pool::Class {
            parts.push(format!("{:?} pooling", self.pool));
        }
        if self.act != Activation::Gelu {
            parts.push(self.act.name().into());
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_family_writes_nothing_and_reads_from_nothing() {
        assert_eq!(serde_json::to_string(&Family::default()).unwrap(), "{}");
        let f: Family = serde_json::from_str("{}").unwrap();
        assert!(f.is_plain());
        let f: Family = serde_json::from_str(
            r#"{"class_token":true,"registers":4,"pos_embed":"patches-only","layer_scale":true,"act":"quick-gelu","pool":"class-and-mean"}"#,
        )
        .unwrap();
        assert_eq!(f.prefix_tokens(), 5);
        assert_eq!(f.register_row(), 1);
        assert_eq!(f.act, Activation::QuickGelu);
        let back: Family = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn contradictions_are_named() {
        let no_cls = Family {
            class_token: false,
            ..Family::default()
        };
        assert!(no_cls
            .validate()
            .unwrap_err()
            .to_string()
            .contains("class_token"));
        let avg = Family {
            pool: Pool::Average,
            ..no_cls
        };
        avg.validate().unwrap();
        assert_eq!(avg.prefix_tokens(), 0);
        // Hugging Face's DeiTForImageClassification: the distillation token
        // takes part in attention, only the class token reaches the head.
        let dist_with_class_pool = Family {
            dist_token: true,
            ..Family::default()
        };
        dist_with_class_pool.validate().unwrap();
        let distilled = Family {
            dist_token: true,
            pool: Pool::Distilled,
            ..Family::default()
        };
        distilled.validate().unwrap();
        assert_eq!((distilled.dist_row(), distilled.prefix_tokens()), (1, 2));
    }
}
