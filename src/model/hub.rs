//! The config.json of a hub folder: what it says that the tensors cannot
//! (heads, LayerNorm epsilon, class names), and what it says that they can,
//! checked against them.
//!
//! Two layouts:
//! - Hugging Face (`save_pretrained`): `architectures` / `model_type`,
//!   `num_attention_heads`, `hidden_size`, `num_hidden_layers`,
//!   `intermediate_size`, `image_size`, `patch_size`, `num_channels`,
//!   `layer_norm_eps`, `hidden_act`, `qkv_bias`, `id2label`. Read:
//!   `ViTForImageClassification`, `ViTModel`.
//! - timm (`save_for_hf`, `push_to_hf_hub`): `architecture` (a timm model
//!   name, its pretrained tag after a dot), `num_classes`, `global_pool`,
//!   `model_args` (the arguments given to the model), `pretrained_cfg`
//!   (`input_size`), `label_names`. Read: `vit_{tiny,small,base,large,huge,
//!   giant,gigantic}_patch<P>_<size>`, whose heads timm's definitions fix,
//!   `model_args.num_heads` overriding.
//!
//! Anything else is refused by name: the engine would compute another model.

use super::checkpoint::NamingScheme;
use super::config::VitConfig;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A shape field a config.json can state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Width,
    Depth,
    Mlp,
    Patch,
    ImageSize,
    Channels,
    Classes,
}

impl Dim {
    fn of(self, cfg: &VitConfig) -> usize {
        match self {
            Dim::Width => cfg.width,
            Dim::Depth => cfg.depth,
            Dim::Mlp => cfg.mlp,
            Dim::Patch => cfg.patch,
            Dim::ImageSize => cfg.image_size,
            Dim::Channels => cfg.channels,
            Dim::Classes => cfg.classes,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dim::Width => "width",
            Dim::Depth => "depth",
            Dim::Mlp => "MLP width",
            Dim::Patch => "patch",
            Dim::ImageSize => "input size",
            Dim::Channels => "channels",
            Dim::Classes => "classes",
        }
    }
}

/// One statement of the config.json about the shape.
struct Expect {
    field: String,
    value: usize,
    dim: Dim,
}

/// What a config.json says.
pub struct HubConfig {
    pub file: PathBuf,
    pub architecture: Option<String>,
    pub heads: usize,
    /// The field the heads came from.
    pub heads_field: String,
    pub ln_eps: Option<f32>,
    pub class_names: Option<Vec<String>>,
    expect: Vec<Expect>,
}

/// The Hugging Face architectures read (a class-token ViT classifier or
/// its backbone).
const HF_ARCHITECTURES: &[&str] = &["ViTForImageClassification", "ViTModel"];

/// timm's plain ViT sizes: (name, width, depth, heads), as its model
/// definitions (`vit_base_patch16_224` and so on) fix them.
const TIMM_SIZES: &[(&str, usize, usize, usize)] = &[
    ("tiny", 192, 12, 3),
    ("small", 384, 12, 6),
    ("base", 768, 12, 12),
    ("large", 1024, 24, 16),
    ("huge", 1280, 32, 16),
    ("giant", 1408, 40, 16),
    ("gigantic", 1664, 48, 16),
];

/// `model_args` keys of a timm config that the engine reads; any other
/// changes the model in a way it does not compute.
const TIMM_MODEL_ARGS: &[&str] = &[
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "in_chans",
    "global_pool",
    "qkv_bias",
    "class_token",
];

/// A JSON object's fields, with errors naming the file and field.
struct Fields<'a> {
    file: &'a Path,
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

impl Fields<'_> {
    fn bad(&self, key: &str, v: &Value, want: &str) -> anyhow::Error {
        anyhow!(
            "{}: field {}{key} = {v} is not {want}",
            self.file.display(),
            self.prefix
        )
    }
    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.map
            .get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.bad(key, v, "a non-negative integer"))
            })
            .transpose()
    }
    /// A size given as `n` or `[n, n]`.
    fn square(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
            other => other.as_u64(),
        };
        n.map(|n| Some(n as usize))
            .ok_or_else(|| self.bad(key, v, "a size n or a square [n, n]"))
    }
    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.map
            .get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.bad(key, v, "a number")))
            .transpose()
    }
    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.map
            .get(key)
            .map(|v| v.as_str().ok_or_else(|| self.bad(key, v, "a string")))
            .transpose()
    }
    /// Error unless the field is absent or equals `want`.
    fn require(&self, key: &str, want: &Value, why: &str) -> Result<()> {
        match self.map.get(key) {
            Some(v) if v != want => bail!(
                "{}: field {}{key} = {v} is not supported: {why}",
                self.file.display(),
                self.prefix
            ),
            _ => Ok(()),
        }
    }
}

impl HubConfig {
    /// Read `file`, for weights whose tensor names are `scheme`'s.
    pub fn read(file: &Path, scheme: NamingScheme) -> Result<HubConfig> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{} is not JSON: {e}", file.display()))?;
        let Some(map) = json.as_object() else {
            bail!("{}: expected a JSON object", file.display());
        };
        let fields = Fields {
            file,
            map,
            prefix: "",
        };
        let (layout, config) = if map.contains_key("architecture") {
            ("timm", Self::timm(&fields)?)
        } else if map.contains_key("architectures") || map.contains_key("model_type") {
            ("Hugging Face", Self::hugging_face(&fields)?)
        } else {
            bail!("{}: neither a Hugging Face config (no field architectures or model_type) nor a timm one (no field architecture)", file.display());
        };
        let expected = match layout {
            "timm" => NamingScheme::Timm,
            _ => NamingScheme::HuggingFace,
        };
        if scheme != expected {
            bail!(
                "{}: a {layout} config, but the weights beside it have {scheme:?} tensor names",
                file.display()
            );
        }
        Ok(config)
    }

    fn hugging_face(f: &Fields<'_>) -> Result<HubConfig> {
        let file = f.file;
        let architecture = match f.map.get("architectures") {
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().map(str::to_string)
            }
            Some(v) => return Err(f.bad("architectures", v, "a list of one class name")),
            None => None,
        };
        if let Some(t) = f.str("model_type")?.filter(|&t| t != "vit") {
            bail!("{}: field model_type = {t:?} names an architecture the engine does not read (it reads model_type \"vit\": {})", file.display(), HF_ARCHITECTURES.join(", "));
        }
        if let Some(a) = architecture
            .as_deref()
            .filter(|a| !HF_ARCHITECTURES.contains(a))
        {
            bail!("{}: field architectures = [{a:?}] names an architecture the engine does not read (it reads {})", file.display(), HF_ARCHITECTURES.join(", "));
        }
        f.require(
            "hidden_act",
            &Value::from("gelu"),
            "the engine computes the exact (erf) GELU, \"gelu\"",
        )?;
        f.require(
            "qkv_bias",
            &Value::from(true),
            "the engine's q, k and v have biases",
        )?;
        let heads = f.usize("num_attention_heads")?.ok_or_else(|| {
            anyhow!(
                "{}: no field num_attention_heads (the number of heads is not in the tensors)",
                file.display()
            )
        })?;
        let mut expect = Vec::new();
        for (field, dim) in [
            ("hidden_size", Dim::Width),
            ("num_hidden_layers", Dim::Depth),
            ("intermediate_size", Dim::Mlp),
            ("patch_size", Dim::Patch),
            ("image_size", Dim::ImageSize),
            ("num_channels", Dim::Channels),
        ] {
            if let Some(value) = f.square(field)? {
                expect.push(Expect {
                    field: field.into(),
                    value,
                    dim,
                });
            }
        }
        let classifier = architecture.as_deref() == Some("ViTForImageClassification");
        let class_names = match f.map.get("id2label").filter(|_| classifier) {
            None => None,
            Some(v) => Some(id2label(f, v)?),
        };
        if let Some(names) = &class_names {
            expect.push(Expect {
                field: "id2label".into(),
                value: names.len(),
                dim: Dim::Classes,
            });
        }
        let ln_eps = f.f64("layer_norm_eps")?.map(|e| e as f32);
        Ok(HubConfig {
            file: file.to_path_buf(),
            architecture,
            heads,
            heads_field: "num_attention_heads".into(),
            ln_eps,
            class_names,
            expect,
        })
    }

    fn timm(f: &Fields<'_>) -> Result<HubConfig> {
        let file = f.file;
        let full = f.str("architecture")?.unwrap_or_default().to_string();
        let name = full.split('.').next().unwrap_or_default();
        let known = timm_architecture(name).ok_or_else(|| {
            anyhow!("{}: field architecture = {full:?} names an architecture the engine does not read (it reads timm's plain ViTs, vit_<size>_patch<P>_<input size> with size one of {})", file.display(), TIMM_SIZES.iter().map(|s| s.0).collect::<Vec<_>>().join(", "))
        })?;
        let empty = Map::new();
        let args_map = match f.map.get("model_args") {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(v) => return Err(f.bad("model_args", v, "an object")),
        };
        let args = Fields {
            file,
            map: args_map,
            prefix: "model_args.",
        };
        if let Some(key) = args_map
            .keys()
            .find(|k| !TIMM_MODEL_ARGS.contains(&k.as_str()))
        {
            bail!("{}: field model_args.{key} = {} is not read by the engine (it reads {}); the model it makes is not one the engine computes", file.display(), args_map[key], TIMM_MODEL_ARGS.join(", "));
        }
        let token = Value::from("token");
        let why_pool = "the engine classifies from the class token (global_pool \"token\")";
        f.require("global_pool", &token, why_pool)?;
        args.require("global_pool", &token, why_pool)?;
        args.require(
            "qkv_bias",
            &Value::from(true),
            "the engine's q, k and v have biases",
        )?;
        args.require(
            "class_token",
            &Value::from(true),
            "the engine's ViT has a class token",
        )?;
        let (heads, heads_field) = match args.usize("num_heads")? {
            Some(h) => (h, "model_args.num_heads".to_string()),
            None => (known.heads, "architecture".to_string()),
        };
        let width = args.usize("embed_dim")?;
        let mut expect = vec![
            Expect {
                field: field_or(width, "model_args.embed_dim", "architecture"),
                value: width.unwrap_or(known.width),
                dim: Dim::Width,
            },
            Expect {
                field: field_or(args.usize("depth")?, "model_args.depth", "architecture"),
                value: args.usize("depth")?.unwrap_or(known.depth),
                dim: Dim::Depth,
            },
            Expect {
                field: field_or(
                    args.square("patch_size")?,
                    "model_args.patch_size",
                    "architecture",
                ),
                value: args.square("patch_size")?.unwrap_or(known.patch),
                dim: Dim::Patch,
            },
            Expect {
                field: field_or(
                    args.square("img_size")?,
                    "model_args.img_size",
                    "architecture",
                ),
                value: args.square("img_size")?.unwrap_or(known.image_size),
                dim: Dim::ImageSize,
            },
        ];
        if let Some(ratio) = args.f64("mlp_ratio")? {
            expect.push(Expect {
                field: "model_args.mlp_ratio".into(),
                value: (width.unwrap_or(known.width) as f64 * ratio) as usize,
                dim: Dim::Mlp,
            });
        }
        if let Some(c) = args.usize("in_chans")? {
            expect.push(Expect {
                field: "model_args.in_chans".into(),
                value: c,
                dim: Dim::Channels,
            });
        }
        for (fields, key) in [(f, "num_classes"), (&args, "num_classes")] {
            if let Some(c) = fields.usize(key)?.filter(|&c| c > 0) {
                expect.push(Expect {
                    field: format!("{}{key}", fields.prefix),
                    value: c,
                    dim: Dim::Classes,
                });
            }
        }
        if let Some(Value::Object(pre)) = f.map.get("pretrained_cfg") {
            if let Some(Value::Array(s)) = pre.get("input_size") {
                let n: Vec<usize> = s
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect();
                if n.len() == 3 && n[1] == n[2] {
                    expect.push(Expect {
                        field: "pretrained_cfg.input_size".into(),
                        value: n[1],
                        dim: Dim::ImageSize,
                    });
                    expect.push(Expect {
                        field: "pretrained_cfg.input_size".into(),
                        value: n[0],
                        dim: Dim::Channels,
                    });
                }
            }
        }
        let class_names = match f.map.get("label_names") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| f.bad("label_names", v, "a list of strings"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => return Err(f.bad("label_names", v, "a list of strings")),
        };
        if let Some(names) = &class_names {
            expect.push(Expect {
                field: "label_names".into(),
                value: names.len(),
                dim: Dim::Classes,
            });
        }
        Ok(HubConfig {
            file: file.to_path_buf(),
            architecture: Some(full),
            heads,
            heads_field,
            ln_eps: None,
            class_names,
            expect,
        })
    }

    /// Error naming the file and field where the config.json says another
    /// shape than the tensors of `weights`.
    pub fn check(&self, shape: &VitConfig, weights: &Path) -> Result<()> {
        for e in &self.expect {
            let actual = e.dim.of(shape);
            if actual != e.value {
                bail!(
                    "{}: field {} says {} {}, but the tensors of {} give {} {actual}",
                    self.file.display(),
                    e.field,
                    e.dim.name(),
                    e.value,
                    weights.display(),
                    e.dim.name()
                );
            }
        }
        Ok(())
    }
}

fn field_or(given: Option<usize>, field: &str, otherwise: &str) -> String {
    if given.is_some() { field } else { otherwise }.to_string()
}

/// What a timm ViT name fixes.
struct TimmArchitecture {
    width: usize,
    depth: usize,
    heads: usize,
    patch: usize,
    image_size: usize,
}

/// `vit_<size>_patch<P>_<input size>`; None for any other name (DeiT,
/// DINOv2, CLIP and pooling variants are other models).
fn timm_architecture(name: &str) -> Option<TimmArchitecture> {
    let parts: Vec<&str> = name.split('_').collect();
    let [vit, size, patch, image] = parts.as_slice() else {
        return None;
    };
    if *vit != "vit" {
        return None;
    }
    let &(_, width, depth, heads) = TIMM_SIZES.iter().find(|s| s.0 == *size)?;
    Some(TimmArchitecture {
        width,
        depth,
        heads,
        patch: patch.strip_prefix("patch")?.parse().ok()?,
        image_size: image.parse().ok()?,
    })
}

/// `id2label` (`{"0": "cat", ...}`) as names in index order.
fn id2label(f: &Fields<'_>, v: &Value) -> Result<Vec<String>> {
    let bad = || f.bad("id2label", v, "an object of class indices 0..n to names");
    let map = v.as_object().ok_or_else(bad)?;
    let mut names = vec![None; map.len()];
    for (k, name) in map {
        let i: usize = k.parse().map_err(|_| bad())?;
        let slot = names.get_mut(i).ok_or_else(bad)?;
        *slot = Some(name.as_str().ok_or_else(bad)?.to_string());
    }
    names.into_iter().map(|n| n.ok_or_else(bad)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_names_fix_plain_vits_only() {
        let b = timm_architecture("vit_base_patch16_224").unwrap();
        assert_eq!(
            (b.width, b.depth, b.heads, b.patch, b.image_size),
            (768, 12, 12, 16, 224)
        );
        assert_eq!(timm_architecture("vit_huge_patch14_224").unwrap().heads, 16);
        for other in [
            "vit_small_patch14_dinov2",
            "vit_base_patch32_clip_224",
            "deit_tiny_patch16_224",
            "vit_medium_patch16_gap_256",
            "vit_base_patch16_224_miil",
        ] {
            assert!(timm_architecture(other).is_none(), "{other}");
        }
    }
}
