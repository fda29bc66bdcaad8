//! Other libraries' tensor names, renamed to the engine's (`model::params`;
//! timm's names with q, k and v as separate layers). Which library wrote a
//! file is read from marker tensors (`detect`); fused q/k/v matrices are
//! split into three layers.
//!
//! | engine | timm | torchvision `vit_b_32` | Hugging Face `ViT*`, `DeiT*` | HF `Dinov2*` | HF `CLIPVisionModel` |
//! |---|---|---|---|---|---|
//! | `cls_token` | same | `class_token` | `embeddings.cls_token` | same as ViT | `embeddings.class_embedding` (`[D]`) |
//! | `dist_token` | same | | `embeddings.distillation_token` | | |
//! | `reg_token` | same | | | `embeddings.register_tokens` | |
//! | `pos_embed` | same | `encoder.pos_embedding` | `embeddings.position_embeddings` | same as ViT | `embeddings.position_embedding.weight` (`[T, D]`) |
//! | `patch_embed.proj.*` | same | `conv_proj.*` | `embeddings.patch_embeddings.projection.*` | same as ViT | `embeddings.patch_embedding.weight` |
//! | `norm_pre.*` | same | | | | `pre_layrnorm.*` |
//! | `blocks.N.norm1.*` | same | `encoder.layers.encoder_layer_N.ln_1.*` | `encoder.layer.N.layernorm_before.*` | `….norm1.*` | `encoder.layers.N.layer_norm1.*` |
//! | `blocks.N.attn.{q,k,v}.*` | `blocks.N.attn.qkv.*` (fused) | `….self_attention.in_proj_{weight,bias}` (fused) | `….attention.attention.{query,key,value}.*` | same as ViT | `….self_attn.{q,k,v}_proj.*` |
//! | `blocks.N.attn.proj.*` | same | `….self_attention.out_proj.*` | `….attention.output.dense.*` | same as ViT | `….self_attn.out_proj.*` |
//! | `blocks.N.ls1.gamma` | same | | | `….layer_scale1.lambda1` | |
//! | `blocks.N.norm2.*` | same | `….ln_2.*` | `….layernorm_after.*` | `….norm2.*` | `….layer_norm2.*` |
//! | `blocks.N.mlp.fc1.*` | same | `….mlp.0.*` (older: `mlp.linear_1`) | `….intermediate.dense.*` | `….mlp.fc1.*` | `….mlp.fc1.*` |
//! | `blocks.N.mlp.fc2.*` | same | `….mlp.3.*` (older: `mlp.linear_2`) | `….output.dense.*` | `….mlp.fc2.*` | `….mlp.fc2.*` |
//! | `blocks.N.ls2.gamma` | same | | | `….layer_scale2.lambda1` | |
//! | `norm.*` | same | `encoder.ln.*` | `layernorm.*` | `layernorm.*` | `post_layernorm.*` |
//! | `fc_norm.*` | same | | | | |
//! | `head.*` | same | `heads.head.*` | `classifier.*` (`cls_classifier.*` with a teacher) | `classifier.*` | |
//! | `head_dist.*` | same | | `distillation_classifier.*` | | |
//!
//! Hugging Face backbones sit under a prefix that names the model
//! (`vit.`, `deit.`, `dinov2.`, `dinov2_with_registers.`, CLIP's
//! `vision_model.` in files that transformers 4 wrote), or none for a bare
//! `*Model`; the classifiers sit outside it. What a library keeps that the
//! forward does not use is dropped: the pooler of `ViTModel` / `DeiTModel`
//! (a dense layer that no class-token classifier reads), the `mask_token`
//! of masked-image pretraining, CLIP's `position_ids` buffer.
//!
//! One conversion is not a renaming, and is exact: Hugging Face's Dinov2
//! with registers adds its position embedding to the class token and the
//! patches but not to the registers, which follow the class token. The
//! engine (as timm's `vit_*_reg4_dinov2`) takes it as a position embedding
//! over the patches only, the class token's row added into the class token.

use super::checkpoint::{NamingScheme, RawTensor};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Which Hugging Face model a file's names are (the renaming differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfModel {
    /// `ViT*` and `DeiT*` (the same block names).
    Vit,
    /// `Dinov2*`, with or without registers.
    Dinov2,
    /// `CLIPVisionModel`.
    Clip,
}

impl HfModel {
    /// The `model_type` values of a config.json for this model.
    pub fn model_types(self) -> &'static [&'static str] {
        match self {
            HfModel::Vit => &["vit", "deit"],
            HfModel::Dinov2 => &["dinov2", "dinov2_with_registers"],
            HfModel::Clip => &["clip_vision_model"],
        }
    }
}

/// Which library's names a file has, and what the renaming needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    Timm,
    Torchvision,
    HuggingFace {
        model: HfModel,
        /// The backbone's prefix (`vit.`, `dinov2.`, ... or empty).
        prefix: String,
    },
}

impl Layout {
    pub fn scheme(&self) -> NamingScheme {
        match self {
            Layout::Timm => NamingScheme::Timm,
            Layout::Torchvision => NamingScheme::Torchvision,
            Layout::HuggingFace { .. } => NamingScheme::HuggingFace,
        }
    }

    /// The Hugging Face model, for a Hugging Face file.
    pub fn hf_model(&self) -> Option<HfModel> {
        match self {
            Layout::HuggingFace { model, .. } => Some(*model),
            _ => None,
        }
    }
}

/// The layout of a foreign file, from marker tensors.
pub fn detect(tensors: &BTreeMap<String, RawTensor>) -> Option<Layout> {
    let has = |k: &str| tensors.contains_key(k);
    if has("pos_embed") && has("patch_embed.proj.weight") {
        return Some(Layout::Timm);
    }
    if has("class_token") && has("conv_proj.weight") {
        return Some(Layout::Torchvision);
    }
    let markers = [
        ("embeddings.cls_token", None),
        ("embeddings.class_embedding", Some(HfModel::Clip)),
    ];
    tensors.keys().find_map(|k| {
        markers.iter().find_map(|(marker, model)| {
            let prefix = k.strip_suffix(marker)?;
            let one_module =
                prefix.is_empty() || prefix.ends_with('.') && prefix.matches('.').count() == 1;
            if !one_module {
                return None;
            }
            let dinov2 = has(&format!("{prefix}encoder.layer.0.norm1.weight"));
            let model = model.unwrap_or(if dinov2 {
                HfModel::Dinov2
            } else {
                HfModel::Vit
            });
            Some(Layout::HuggingFace {
                model,
                prefix: prefix.to_string(),
            })
        })
    })
}

/// The tensors of a file of `layout`, under the engine's names.
pub fn to_engine_names(
    tensors: BTreeMap<String, RawTensor>,
    layout: &Layout,
    path: &Path,
) -> Result<BTreeMap<String, RawTensor>> {
    match layout {
        Layout::Timm => split_fused(tensors, path),
        Layout::Torchvision => split_fused(from_torchvision(tensors), path),
        Layout::HuggingFace { model, prefix } => from_hugging_face(tensors, *model, prefix, path),
    }
}

/// Split every `blocks.N.attn.qkv.weight` `[3D, D]` (and `.bias` `[3D]`,
/// where there is one) into `blocks.N.attn.{q,k,v}.*`.
fn split_fused(
    mut tensors: BTreeMap<String, RawTensor>,
    path: &Path,
) -> Result<BTreeMap<String, RawTensor>> {
    let depth = count_blocks(&tensors, "blocks.");
    for i in 0..depth {
        let base = format!("blocks.{i}.attn.qkv");
        if !tensors.contains_key(&format!("{base}.weight")) {
            bail!("{}: missing tensor {base}.weight", path.display());
        }
        for (suffix, is_weight) in [("weight", true), ("bias", false)] {
            let name = format!("{base}.{suffix}");
            let Some(t) = tensors.remove(&name) else {
                continue;
            };
            if t.shape.is_empty() || t.shape[0] % 3 != 0 {
                bail!("{}: tensor {name} has shape {:?}; a fused q/k/v needs a first dimension divisible by 3", path.display(), t.shape);
            }
            let d = t.shape[0] / 3;
            let chunk = t.data.len() / 3;
            for (j, part) in ["q", "k", "v"].iter().enumerate() {
                let shape = if is_weight {
                    vec![d, t.shape.get(1).copied().unwrap_or(0)]
                } else {
                    vec![d]
                };
                tensors.insert(
                    format!("blocks.{i}.attn.{part}.{suffix}"),
                    RawTensor {
                        shape,
                        data: t.data[j * chunk..(j + 1) * chunk].to_vec(),
                    },
                );
            }
        }
    }
    Ok(tensors)
}

/// Number of blocks: one more than the largest index after `prefix`.
pub fn count_blocks(tensors: &BTreeMap<String, RawTensor>, prefix: &str) -> usize {
    tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|i| i.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Rename keys by `rule` (None keeps a key as it is).
fn rename(
    tensors: BTreeMap<String, RawTensor>,
    rule: impl Fn(&str) -> Option<String>,
) -> BTreeMap<String, RawTensor> {
    tensors
        .into_iter()
        .map(|(k, v)| (rule(&k).unwrap_or(k), v))
        .collect()
}

fn from_torchvision(tensors: BTreeMap<String, RawTensor>) -> BTreeMap<String, RawTensor> {
    const LAYER: &str = "encoder.layers.encoder_layer_";
    rename(tensors, |k| {
        let fixed = match k {
            "class_token" => "cls_token",
            "encoder.pos_embedding" => "pos_embed",
            "conv_proj.weight" => "patch_embed.proj.weight",
            "conv_proj.bias" => "patch_embed.proj.bias",
            "encoder.ln.weight" => "norm.weight",
            "encoder.ln.bias" => "norm.bias",
            "heads.head.weight" => "head.weight",
            "heads.head.bias" => "head.bias",
            _ => "",
        };
        if !fixed.is_empty() {
            return Some(fixed.to_string());
        }
        let rest = k.strip_prefix(LAYER)?;
        let (i, tail) = rest.split_once('.')?;
        let new_tail = match tail {
            "ln_1.weight" => "norm1.weight",
            "ln_1.bias" => "norm1.bias",
            "ln_2.weight" => "norm2.weight",
            "ln_2.bias" => "norm2.bias",
            "self_attention.in_proj_weight" => "attn.qkv.weight",
            "self_attention.in_proj_bias" => "attn.qkv.bias",
            "self_attention.out_proj.weight" => "attn.proj.weight",
            "self_attention.out_proj.bias" => "attn.proj.bias",
            "mlp.0.weight" | "mlp.linear_1.weight" => "mlp.fc1.weight",
            "mlp.0.bias" | "mlp.linear_1.bias" => "mlp.fc1.bias",
            "mlp.3.weight" | "mlp.linear_2.weight" => "mlp.fc2.weight",
            "mlp.3.bias" | "mlp.linear_2.bias" => "mlp.fc2.bias",
            _ => return None,
        };
        Some(format!("blocks.{i}.{new_tail}"))
    })
}

/// The engine's name of a Hugging Face backbone tensor outside the blocks
/// (the prefix taken off); "" for one that is dropped.
fn hf_fixed(k: &str) -> Option<&'static str> {
    Some(match k {
        "embeddings.cls_token" | "embeddings.class_embedding" => "cls_token",
        "embeddings.distillation_token" => "dist_token",
        "embeddings.register_tokens" => "reg_token",
        "embeddings.position_embeddings" | "embeddings.position_embedding.weight" => "pos_embed",
        "embeddings.patch_embeddings.projection.weight" | "embeddings.patch_embedding.weight" => {
            "patch_embed.proj.weight"
        }
        "embeddings.patch_embeddings.projection.bias" | "embeddings.patch_embedding.bias" => {
            "patch_embed.proj.bias"
        }
        "pre_layrnorm.weight" => "norm_pre.weight",
        "pre_layrnorm.bias" => "norm_pre.bias",
        "layernorm.weight" | "post_layernorm.weight" => "norm.weight",
        "layernorm.bias" | "post_layernorm.bias" => "norm.bias",
        "embeddings.mask_token"
        | "embeddings.position_ids"
        | "pooler.dense.weight"
        | "pooler.dense.bias" => "",
        _ => return None,
    })
}

/// The engine's module of a Hugging Face block module (ViT, DeiT, Dinov2
/// and CLIP names).
fn hf_block_module(module: &str) -> Option<&'static str> {
    Some(match module {
        "layernorm_before" | "norm1" | "layer_norm1" => "norm1",
        "layernorm_after" | "norm2" | "layer_norm2" => "norm2",
        "attention.attention.query" | "self_attn.q_proj" => "attn.q",
        "attention.attention.key" | "self_attn.k_proj" => "attn.k",
        "attention.attention.value" | "self_attn.v_proj" => "attn.v",
        "attention.output.dense" | "self_attn.out_proj" => "attn.proj",
        "intermediate.dense" | "mlp.fc1" => "mlp.fc1",
        "output.dense" | "mlp.fc2" => "mlp.fc2",
        "layer_scale1" => "ls1",
        "layer_scale2" => "ls2",
        _ => return None,
    })
}

/// The engine's name of a Hugging Face tensor (the backbone's prefix
/// taken off), "" for one that is dropped, None for one it does not know.
fn hf_name(k: &str, prefix: &str) -> Option<String> {
    let head = match k {
        "classifier.weight" | "cls_classifier.weight" => Some("head.weight"),
        "classifier.bias" | "cls_classifier.bias" => Some("head.bias"),
        "distillation_classifier.weight" => Some("head_dist.weight"),
        "distillation_classifier.bias" => Some("head_dist.bias"),
        _ => None,
    };
    if let Some(h) = head {
        return Some(h.to_string());
    }
    let k = k.strip_prefix(prefix)?;
    if let Some(fixed) = hf_fixed(k) {
        return Some(fixed.to_string());
    }
    let rest = k
        .strip_prefix("encoder.layer.")
        .or_else(|| k.strip_prefix("encoder.layers."))?;
    let (i, tail) = rest.split_once('.')?;
    let (module, param) = tail.rsplit_once('.')?;
    let param = if param == "lambda1" { "gamma" } else { param };
    Some(format!("blocks.{i}.{}.{param}", hf_block_module(module)?))
}

fn from_hugging_face(
    tensors: BTreeMap<String, RawTensor>,
    model: HfModel,
    prefix: &str,
    path: &Path,
) -> Result<BTreeMap<String, RawTensor>> {
    if let Some(k) = tensors.keys().find(|k| k.contains(".mlp.weights_in.")) {
        bail!("{}: tensor {k} is of a SwiGLU MLP (Dinov2 use_swiglu_ffn, as DINOv2 giant has); the engine computes the MLP of fc1, an activation and fc2 only", path.display());
    }
    if let Some(k) = tensors.keys().find(|k| k.starts_with("text_model.")) {
        bail!("{}: tensor {k} is of CLIP's text tower: this is a whole CLIPModel; the engine reads the vision tower alone (CLIPVisionModel.from_pretrained(...).save_pretrained(...) writes it)", path.display());
    }
    let mut renamed = BTreeMap::new();
    for (k, v) in tensors {
        match hf_name(&k, prefix) {
            Some(name) if name.is_empty() => {}
            Some(name) => {
                renamed.insert(name, v);
            }
            None => {
                renamed.insert(k, v);
            }
        }
    }
    if model == HfModel::Clip {
        clip_shapes(&mut renamed);
    }
    if model == HfModel::Dinov2 && renamed.contains_key("reg_token") {
        position_of_class_into_class_token(&mut renamed, path)?;
    }
    Ok(renamed)
}

/// CLIP's class token `[D]` and position embedding `[T, D]` as timm's
/// `[1, 1, D]` and `[1, T, D]`.
fn clip_shapes(tensors: &mut BTreeMap<String, RawTensor>) {
    if let Some(t) = tensors.get_mut("cls_token").filter(|t| t.shape.len() == 1) {
        t.shape = vec![1, 1, t.shape[0]];
    }
    if let Some(t) = tensors.get_mut("pos_embed").filter(|t| t.shape.len() == 2) {
        t.shape = vec![1, t.shape[0], t.shape[1]];
    }
}

/// Dinov2 with registers: the position embedding's first row (the class
/// token's) added into the class token and taken out of the embedding,
/// which then covers the patches only (module doc).
fn position_of_class_into_class_token(
    tensors: &mut BTreeMap<String, RawTensor>,
    path: &Path,
) -> Result<()> {
    let (Some(pos), Some(cls)) = (tensors.get("pos_embed"), tensors.get("cls_token")) else {
        bail!(
            "{}: a Dinov2 with registers needs embeddings.position_embeddings and embeddings.cls_token",
            path.display()
        );
    };
    let d = cls.data.len();
    if pos.shape.len() != 3 || pos.shape[2] != d || pos.shape[1] < 2 {
        bail!(
            "{}: position embedding of shape {:?} does not fit a class token of width {d}",
            path.display(),
            pos.shape
        );
    }
    let class_row: Vec<f32> = pos.data[..d].to_vec();
    let patches = RawTensor {
        shape: vec![1, pos.shape[1] - 1, d],
        data: pos.data[d..].to_vec(),
    };
    let cls = tensors.get_mut("cls_token").expect("checked above");
    for (c, p) in cls.data.iter_mut().zip(&class_row) {
        *c += p;
    }
    tensors.insert("pos_embed".into(), patches);
    Ok(())
}
