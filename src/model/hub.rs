//! The config.json of a hub folder: what it says that the tensors cannot
//! (heads, activation, LayerNorm epsilon, class names), and what it says
//! that they can (shape, prefix tokens, LayerScale, pooling...), checked
//! against them.
//!
//! Two layouts:
//! - Hugging Face (`save_pretrained`): `architectures` / `model_type`,
//!   `num_attention_heads`, `hidden_size`, `num_hidden_layers`,
//!   `intermediate_size` (Dinov2: `mlp_ratio`), `image_size`, `patch_size`,
//!   `num_channels`, `layer_norm_eps`, `hidden_act`, `qkv_bias`,
//!   `num_register_tokens`, `use_swiglu_ffn`, `id2label`. Read: the
//!   architectures of `HF_ARCHITECTURES`.
//! - timm (`save_for_hf`, `push_to_hf_hub`): `architecture` (a timm model
//!   name, its pretrained tag after a dot), `num_classes`, `global_pool`,
//!   `model_args` (the arguments given to the model, overriding what the
//!   name fixes), `pretrained_cfg` (`input_size`), `label_names`. Read: the
//!   names `timm_architecture` knows (plain ViT, CLIP, DINOv2, DeiT,
//!   DeiT-III), whose width, depth, heads and family timm's definitions fix.
//!
//! Anything else is refused by name: the engine would compute another model.

use super::config::VitConfig;
use super::family::{Family, Pool, PosEmbed};
use super::rename::{HfModel, Layout};
use crate::data::Normalize;
use crate::ops::gelu::Activation;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// A setting of the model a config.json can state and the tensors show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Width,
    Depth,
    Mlp,
    Patch,
    ImageSize,
    Channels,
    Classes,
    ClassToken,
    DistToken,
    Registers,
    PosEmbed,
    PatchBias,
    QkvBias,
    NormPre,
    LayerScale,
    Pool,
}

/// The value of a `Dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Said {
    Count(usize),
    Yes(bool),
    Pos(PosEmbed),
    Pool(Pool),
}

impl fmt::Display for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Said::Count(n) => write!(f, "{n}"),
            Said::Yes(b) => write!(f, "{}", if *b { "yes" } else { "no" }),
            Said::Pos(PosEmbed::AllTokens) => write!(f, "over every token"),
            Said::Pos(PosEmbed::PatchesOnly) => write!(f, "over the patches only"),
            Said::Pool(p) => write!(f, "{p:?}"),
        }
    }
}

impl Dim {
    fn of(self, cfg: &VitConfig) -> Said {
        let fam = &cfg.family;
        match self {
            Dim::Width => Said::Count(cfg.width),
            Dim::Depth => Said::Count(cfg.depth),
            Dim::Mlp => Said::Count(cfg.mlp),
            Dim::Patch => Said::Count(cfg.patch),
            Dim::ImageSize => Said::Count(cfg.image_size),
            Dim::Channels => Said::Count(cfg.channels),
            Dim::Classes => Said::Count(cfg.classes),
            Dim::ClassToken => Said::Yes(fam.class_token),
            Dim::DistToken => Said::Yes(fam.dist_token),
            Dim::Registers => Said::Count(fam.registers),
            Dim::PosEmbed => Said::Pos(fam.pos_embed),
            Dim::PatchBias => Said::Yes(fam.patch_bias),
            Dim::QkvBias => Said::Yes(fam.qkv_bias),
            Dim::NormPre => Said::Yes(fam.norm_pre),
            Dim::LayerScale => Said::Yes(fam.layer_scale),
            Dim::Pool => Said::Pool(fam.pool),
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
            Dim::ClassToken => "class token",
            Dim::DistToken => "distillation token",
            Dim::Registers => "registers",
            Dim::PosEmbed => "position embedding",
            Dim::PatchBias => "patch embedding bias",
            Dim::QkvBias => "q, k, v biases",
            Dim::NormPre => "LayerNorm before the blocks (norm_pre)",
            Dim::LayerScale => "LayerScale",
            Dim::Pool => "pooling",
        }
    }
}

/// One statement of the config.json about the model.
struct Expect {
    /// The field that says it, as errors name it.
    field: String,
    value: Said,
    dim: Dim,
}

/// What a config.json says.
pub struct HubConfig {
    pub file: PathBuf,
    pub architecture: Option<String>,
    pub heads: usize,
    /// The field the heads came from.
    pub heads_field: String,
    /// The MLP's activation and the field that says it.
    pub act: Option<(Activation, String)>,
    pub ln_eps: Option<f32>,
    pub class_names: Option<Vec<String>>,
    /// The input normalization the weights were trained with, and what
    /// says it.
    pub normalize: Option<(Normalize, String)>,
    expect: Vec<Expect>,
}

/// The Hugging Face architectures read: name, `model_type`, and the
/// pooling of its classifier (None: a backbone without one).
const HF_ARCHITECTURES: &[(&str, &str, Option<Pool>)] = &[
    ("ViTForImageClassification", "vit", Some(Pool::Class)),
    ("ViTModel", "vit", None),
    ("DeiTForImageClassification", "deit", Some(Pool::Class)),
    (
        "DeiTForImageClassificationWithTeacher",
        "deit",
        Some(Pool::Distilled),
    ),
    ("DeiTModel", "deit", None),
    (
        "Dinov2ForImageClassification",
        "dinov2",
        Some(Pool::ClassAndMean),
    ),
    ("Dinov2Model", "dinov2", None),
    (
        "Dinov2WithRegistersForImageClassification",
        "dinov2_with_registers",
        Some(Pool::ClassAndMean),
    ),
    ("Dinov2WithRegistersModel", "dinov2_with_registers", None),
    ("CLIPVisionModel", "clip_vision_model", None),
];

/// Hugging Face's `hidden_act` names of the activations the engine computes.
const HF_ACTS: &[(&str, Activation)] = &[
    ("gelu", Activation::Gelu),
    ("gelu_pytorch_tanh", Activation::GeluTanh),
    ("gelu_new", Activation::GeluTanh),
    ("quick_gelu", Activation::QuickGelu),
];

/// timm's `act_layer` names of the activations the engine computes.
const TIMM_ACTS: &[(&str, Activation)] = &[
    ("gelu", Activation::Gelu),
    ("gelu_tanh", Activation::GeluTanh),
    ("quick_gelu", Activation::QuickGelu),
];

/// timm's ViT sizes: (name, width, depth, heads), as its model definitions
/// (`vit_base_patch16_224`, `deit3_medium_patch16_224`, ...) fix them.
const TIMM_SIZES: &[(&str, usize, usize, usize)] = &[
    ("tiny", 192, 12, 3),
    ("small", 384, 12, 6),
    ("medium", 512, 12, 8),
    ("base", 768, 12, 12),
    ("large", 1024, 24, 16),
    ("huge", 1280, 32, 16),
    ("giant", 1408, 40, 16),
    ("gigantic", 1664, 48, 16),
];

/// `model_args` keys of a timm config that the engine reads.
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
    "no_embed_class",
    "reg_tokens",
    "init_values",
    "pre_norm",
    "fc_norm",
    "act_layer",
];

/// `model_args` keys that change training or inputs of other sizes only,
/// not the function the engine computes at the checkpoint's input size.
const TIMM_INERT_ARGS: &[&str] = &[
    "drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "weight_init",
    "dynamic_img_size",
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
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.map
            .get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.bad(key, v, "true or false")))
            .transpose()
    }
    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.map
            .get(key)
            .map(|v| v.as_str().ok_or_else(|| self.bad(key, v, "a string")))
            .transpose()
    }
    /// `prefix` + `key` = the value, as errors name a field.
    fn label(&self, key: &str) -> String {
        match self.map.get(key) {
            Some(v) => format!("{}{key} = {v}", self.prefix),
            None => format!("{}{key}", self.prefix),
        }
    }
    /// An activation named by field `key` from `names`.
    fn act(&self, key: &str, names: &[(&str, Activation)]) -> Result<Option<Activation>> {
        let Some(name) = self.str(key)? else {
            return Ok(None);
        };
        let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        names
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, a)| Some(a))
            .ok_or_else(|| {
                anyhow!(
                    "{}: field {}{key} = {name:?} is an activation the engine does not compute (it computes {})",
                    self.file.display(),
                    self.prefix,
                    known.join(", ")
                )
            })
    }
}

impl HubConfig {
    /// Read `file`, for weights whose tensor names are of `layout`.
    pub fn read(file: &Path, layout: &Layout) -> Result<HubConfig> {
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
        if map.contains_key("architecture") {
            if *layout != Layout::Timm {
                bail!(
                    "{}: a timm config, but the weights beside it have {:?} tensor names",
                    file.display(),
                    layout.scheme()
                );
            }
            Self::timm(&fields)
        } else if map.contains_key("architectures") || map.contains_key("model_type") {
            let Some(model) = layout.hf_model() else {
                bail!(
                    "{}: a Hugging Face config, but the weights beside it have {:?} tensor names",
                    file.display(),
                    layout.scheme()
                );
            };
            Self::hugging_face(&fields, model)
        } else {
            bail!("{}: neither a Hugging Face config (no field architectures or model_type) nor a timm one (no field architecture)", file.display());
        }
    }

    /// The position embedding the config states, if it does: it decides a
    /// shape that fits both (`model::import`).
    pub fn pos_embed(&self) -> Option<PosEmbed> {
        self.expect.iter().find_map(|e| match e.value {
            Said::Pos(p) => Some(p),
            _ => None,
        })
    }

    fn hugging_face(f: &Fields<'_>, tensors: HfModel) -> Result<HubConfig> {
        let file = f.file;
        let known = || {
            HF_ARCHITECTURES
                .iter()
                .map(|a| a.0)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let architecture = match f.map.get("architectures") {
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().map(str::to_string)
            }
            Some(v) => return Err(f.bad("architectures", v, "a list of one class name")),
            None => None,
        };
        let arch = match architecture.as_deref() {
            None => None,
            Some(a) => Some(HF_ARCHITECTURES.iter().find(|x| x.0 == a).ok_or_else(|| {
                anyhow!("{}: field architectures = [{a:?}] names an architecture the engine does not read (it reads {})", file.display(), known())
            })?),
        };
        let model_type = match (f.str("model_type")?, arch) {
            (Some(t), Some(&(a, at, _))) if t != at => bail!(
                "{}: field model_type = {t:?}, but field architectures = [{a:?}] is a {at:?} model",
                file.display()
            ),
            (Some(t), _) => t,
            (None, Some(&(_, at, _))) => at,
            (None, None) => unreachable!("read() saw architectures or model_type"),
        };
        if model_type == "clip" {
            bail!("{}: field model_type = \"clip\": a whole CLIPModel (text and vision towers); the engine reads the vision tower alone (CLIPVisionModel.from_pretrained(...).save_pretrained(...) writes it)", file.display());
        }
        if !HF_ARCHITECTURES.iter().any(|a| a.1 == model_type) {
            bail!("{}: field model_type = {model_type:?} names an architecture the engine does not read (it reads {})", file.display(), known());
        }
        if !tensors.model_types().contains(&model_type) {
            bail!("{}: field model_type = {model_type:?}, but the weights beside it have the tensor names of a {tensors:?} model (model_type {})", file.display(), tensors.model_types().join(" or "));
        }
        let heads = f.usize("num_attention_heads")?.ok_or_else(|| {
            anyhow!(
                "{}: no field num_attention_heads (the number of heads is not in the tensors)",
                file.display()
            )
        })?;
        let act = match f.act("hidden_act", HF_ACTS)? {
            Some(a) => (a, "hidden_act".to_string()),
            None => {
                let default = if model_type == "clip_vision_model" {
                    Activation::QuickGelu
                } else {
                    Activation::Gelu
                };
                (
                    default,
                    format!("model_type {model_type:?} (transformers' default hidden_act)"),
                )
            }
        };
        let mut expect = Vec::new();
        let mut shape = |field: &str, dim: Dim| -> Result<()> {
            if let Some(value) = f.square(field)? {
                expect.push(Expect {
                    field: field.into(),
                    value: Said::Count(value),
                    dim,
                });
            }
            Ok(())
        };
        shape("hidden_size", Dim::Width)?;
        shape("num_hidden_layers", Dim::Depth)?;
        shape("intermediate_size", Dim::Mlp)?;
        shape("patch_size", Dim::Patch)?;
        shape("image_size", Dim::ImageSize)?;
        shape("num_channels", Dim::Channels)?;
        let mut say = |field: String, dim: Dim, value: Said| {
            expect.push(Expect { field, value, dim });
        };
        if let Some(q) = f.bool("qkv_bias")? {
            say(f.label("qkv_bias"), Dim::QkvBias, Said::Yes(q));
        }
        let type_field = format!("model_type = {model_type:?}");
        match model_type {
            "deit" => say(type_field, Dim::DistToken, Said::Yes(true)),
            "clip_vision_model" => {
                say(type_field.clone(), Dim::NormPre, Said::Yes(true));
                say(type_field, Dim::PatchBias, Said::Yes(false));
            }
            "dinov2" | "dinov2_with_registers" => {
                if f.bool("use_swiglu_ffn")? == Some(true) {
                    bail!("{}: field use_swiglu_ffn = true: a SwiGLU MLP (as DINOv2 giant has), which the engine does not compute (it computes fc1, an activation, fc2)", file.display());
                }
                say(type_field, Dim::LayerScale, Said::Yes(true));
                let registers = f.usize("num_register_tokens")?.unwrap_or(0);
                say(
                    f.label("num_register_tokens"),
                    Dim::Registers,
                    Said::Count(registers),
                );
                if let (Some(r), Some(w)) = (f.f64("mlp_ratio")?, f.usize("hidden_size")?) {
                    say(
                        f.label("mlp_ratio"),
                        Dim::Mlp,
                        Said::Count((w as f64 * r) as usize),
                    );
                }
            }
            _ => {}
        }
        if let Some(&(a, _, Some(pool))) = arch {
            say(
                format!("architectures = [{a:?}]"),
                Dim::Pool,
                Said::Pool(pool),
            );
        }
        let classifier = arch.is_some_and(|a| a.2.is_some());
        let class_names = match f.map.get("id2label").filter(|_| classifier) {
            None => None,
            Some(v) => Some(id2label(f, v)?),
        };
        if let Some(names) = &class_names {
            say("id2label".into(), Dim::Classes, Said::Count(names.len()));
        }
        let ln_eps = f.f64("layer_norm_eps")?.map(|e| e as f32);
        Ok(HubConfig {
            file: file.to_path_buf(),
            architecture,
            heads,
            heads_field: "num_attention_heads".into(),
            act: Some(act),
            ln_eps,
            class_names,
            normalize: hf_normalize(file, model_type)?,
            expect,
        })
    }

    fn timm(f: &Fields<'_>) -> Result<HubConfig> {
        let file = f.file;
        let full = f.str("architecture")?.unwrap_or_default().to_string();
        let name = full.split('.').next().unwrap_or_default();
        let known = timm_architecture(name).map_err(|why| {
            anyhow!(
                "{}: field architecture = {full:?} names an architecture the engine does not read: {why}",
                file.display()
            )
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
        if let Some(key) = args_map.keys().find(|k| {
            !TIMM_MODEL_ARGS.contains(&k.as_str()) && !TIMM_INERT_ARGS.contains(&k.as_str())
        }) {
            bail!("{}: field model_args.{key} = {} is not read by the engine (it reads {}); the model it makes is not one the engine computes", file.display(), args_map[key], TIMM_MODEL_ARGS.join(", "));
        }
        let arch_field = format!("architecture = {full:?}");
        let (heads, heads_field) = match args.usize("num_heads")? {
            Some(h) => (h, "model_args.num_heads".to_string()),
            None => (known.heads, "architecture".to_string()),
        };
        let mut expect = Vec::new();
        let mut say = |field: String, dim: Dim, value: Said| {
            expect.push(Expect { field, value, dim });
        };
        let width = args.usize("embed_dim")?;
        for (key, dim, default) in [
            ("embed_dim", Dim::Width, known.width),
            ("depth", Dim::Depth, known.depth),
            ("patch_size", Dim::Patch, known.patch),
            ("img_size", Dim::ImageSize, known.image_size),
        ] {
            match args.square(key)? {
                Some(v) => say(format!("model_args.{key}"), dim, Said::Count(v)),
                None => say("architecture".into(), dim, Said::Count(default)),
            }
        }
        if let Some(ratio) = args.f64("mlp_ratio")? {
            let mlp = (width.unwrap_or(known.width) as f64 * ratio) as usize;
            say("model_args.mlp_ratio".into(), Dim::Mlp, Said::Count(mlp));
        }
        if let Some(c) = args.usize("in_chans")? {
            say("model_args.in_chans".into(), Dim::Channels, Said::Count(c));
        }
        for fields in [f, &args] {
            if let Some(c) = fields.usize("num_classes")?.filter(|&c| c > 0) {
                let field = format!("{}num_classes", fields.prefix);
                say(field, Dim::Classes, Said::Count(c));
            }
        }
        timm_family(f, &args, &known, &arch_field, &mut say)?;
        if let Some(Value::Object(pre)) = f.map.get("pretrained_cfg") {
            if let Some(Value::Array(s)) = pre.get("input_size") {
                let n: Vec<usize> = s
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect();
                if n.len() == 3 && n[1] == n[2] {
                    let field = "pretrained_cfg.input_size".to_string();
                    say(field.clone(), Dim::ImageSize, Said::Count(n[1]));
                    say(field, Dim::Channels, Said::Count(n[0]));
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
            say("label_names".into(), Dim::Classes, Said::Count(names.len()));
        }
        let act = match args.act("act_layer", TIMM_ACTS)? {
            Some(a) => (a, "model_args.act_layer".to_string()),
            None => (known.family.act, arch_field),
        };
        Ok(HubConfig {
            file: file.to_path_buf(),
            architecture: Some(full),
            heads,
            heads_field,
            act: Some(act),
            ln_eps: Some(known.ln_eps),
            class_names,
            normalize: timm_normalize(f)?,
            expect,
        })
    }

    /// Error naming the file and field where the config.json says another
    /// model than the tensors of `weights` are.
    pub fn check(&self, cfg: &VitConfig, weights: &Path) -> Result<()> {
        for e in &self.expect {
            let actual = e.dim.of(cfg);
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

/// What a timm config says of the family: the architecture's, as its
/// `model_args` change it, each said by the field that fixes it.
fn timm_family(
    f: &Fields<'_>,
    args: &Fields<'_>,
    known: &TimmArchitecture,
    arch_field: &str,
    say: &mut impl FnMut(String, Dim, Said),
) -> Result<()> {
    let fam = known.family;
    let from = |key: &str| -> String {
        if args.map.contains_key(key) {
            args.label(key)
        } else {
            arch_field.to_string()
        }
    };
    let flag =
        |key: &str, default: bool| -> Result<bool> { Ok(args.bool(key)?.unwrap_or(default)) };
    say(
        from("class_token"),
        Dim::ClassToken,
        Said::Yes(flag("class_token", fam.class_token)?),
    );
    say(
        arch_field.to_string(),
        Dim::DistToken,
        Said::Yes(fam.dist_token),
    );
    let registers = args.usize("reg_tokens")?.unwrap_or(fam.registers);
    say(from("reg_tokens"), Dim::Registers, Said::Count(registers));
    let patches_only = fam.pos_embed == PosEmbed::PatchesOnly;
    let pos = match flag("no_embed_class", patches_only)? {
        true => PosEmbed::PatchesOnly,
        false => PosEmbed::AllTokens,
    };
    say(from("no_embed_class"), Dim::PosEmbed, Said::Pos(pos));
    let pre_norm = flag("pre_norm", fam.norm_pre)?;
    say(from("pre_norm"), Dim::NormPre, Said::Yes(pre_norm));
    // timm's patch embedding has a bias exactly when there is no norm_pre.
    say(from("pre_norm"), Dim::PatchBias, Said::Yes(!pre_norm));
    say(
        from("qkv_bias"),
        Dim::QkvBias,
        Said::Yes(flag("qkv_bias", fam.qkv_bias)?),
    );
    let layer_scale = match args.map.get("init_values") {
        None => fam.layer_scale,
        Some(Value::Null) => false,
        Some(v) if v.is_number() => true,
        Some(v) => return Err(args.bad("init_values", v, "null or a number")),
    };
    say(from("init_values"), Dim::LayerScale, Said::Yes(layer_scale));
    let (pool_field, pool_name) = match (args.str("global_pool")?, f.str("global_pool")?) {
        (Some(a), Some(t)) if a != t => bail!(
            "{}: field {} contradicts field {}",
            f.file.display(),
            f.label("global_pool"),
            args.label("global_pool")
        ),
        (Some(p), _) => (args.label("global_pool"), p),
        (None, Some(p)) => (f.label("global_pool"), p),
        (None, None) => (arch_field.to_string(), "token"),
    };
    let pool = match pool_name {
        "token" if fam.dist_token => Pool::Distilled,
        "token" => Pool::Class,
        "avg" => Pool::Average,
        other => bail!("{}: field {pool_field}: global_pool {other:?} is a pooling the engine does not compute (it computes \"token\" and \"avg\")", f.file.display()),
    };
    if let Some(fc) = args.bool("fc_norm")? {
        if fc != (pool == Pool::Average) {
            bail!("{}: field {} with global_pool {pool_name:?}: the engine computes timm's default, fc_norm exactly with average pooling", f.file.display(), args.label("fc_norm"));
        }
    }
    say(pool_field, Dim::Pool, Said::Pool(pool));
    Ok(())
}

/// What a timm model name fixes.
#[derive(Debug)]
struct TimmArchitecture {
    width: usize,
    depth: usize,
    heads: usize,
    patch: usize,
    image_size: usize,
    family: Family,
    ln_eps: f32,
}

/// The names `timm_architecture` reads, for errors.
const TIMM_NAMES: &str = "vit_<size>_patch<P>_<input size>, vit_<size>_patch<P>_clip[_quickgelu]_<input size>, vit_<size>_patch<P>[_reg4]_dinov2, deit_<size>[_distilled]_patch<P>_<input size> and deit3_<size>_patch<P>_<input size>";

/// What timm's definition of model `name` fixes, or why the engine does not
/// read it:
/// - `vit_<size>_patch<P>_<input>`: the plain ViT;
/// - `vit_<size>_patch<P>_clip_<input>` (and `_clip_quickgelu_`): norm_pre,
///   no patch bias, LayerNorm eps 1e-5, GELU (QuickGELU);
/// - `vit_<size>_patch<P>_dinov2` (518 px): LayerScale; `_reg4_dinov2`:
///   with 4 registers and the position embedding on the patches only;
/// - `deit_<size>_patch<P>_<input>`: the plain ViT; `deit_<size>_distilled_…`:
///   a distillation token and its head;
/// - `deit3_<size>_patch<P>_<input>`: LayerScale, position embedding on the
///   patches only.
fn timm_architecture(name: &str) -> Result<TimmArchitecture, String> {
    let unknown = || format!("it reads timm's {TIMM_NAMES}");
    let parts: Vec<&str> = name.split('_').collect();
    let [kind, size, rest @ ..] = parts.as_slice() else {
        return Err(unknown());
    };
    let (distilled, rest) = match rest {
        ["distilled", rest @ ..] if *kind == "deit" => (true, rest),
        _ => (false, rest),
    };
    let [patch, tail @ ..] = rest else {
        return Err(unknown());
    };
    let patch: usize = patch
        .strip_prefix("patch")
        .and_then(|p| p.parse().ok())
        .ok_or_else(unknown)?;
    let input = |s: &str| s.parse::<usize>().map_err(|_| unknown());
    let plain = Family::default();
    let clip = Family {
        norm_pre: true,
        patch_bias: false,
        ..plain
    };
    let layer_scale = Family {
        layer_scale: true,
        ..plain
    };
    let (family, image_size, ln_eps) = match (*kind, tail) {
        ("vit", ["dinov2"]) if *size == "giant" => {
            return Err(format!("timm's {name} has a SwiGLU MLP, which the engine does not compute (it computes fc1, an activation, fc2)"))
        }
        ("vit", ["reg4", "dinov2"]) if *size == "giant" => {
            return Err(format!("timm's {name} has a SwiGLU MLP, which the engine does not compute (it computes fc1, an activation, fc2)"))
        }
        ("vit", ["dinov2"]) => (layer_scale, 518, 1e-6),
        ("vit", ["reg4", "dinov2"]) => (
            Family {
                registers: 4,
                pos_embed: PosEmbed::PatchesOnly,
                ..layer_scale
            },
            518,
            1e-6,
        ),
        ("vit", [img]) => (plain, input(img)?, 1e-6),
        ("vit", ["clip", img]) => (clip, input(img)?, 1e-5),
        ("vit", ["clip", "quickgelu", img]) => (
            Family {
                act: Activation::QuickGelu,
                ..clip
            },
            input(img)?,
            1e-5,
        ),
        ("deit", [img]) if distilled => (
            Family {
                dist_token: true,
                pool: Pool::Distilled,
                ..plain
            },
            input(img)?,
            1e-6,
        ),
        ("deit", [img]) => (plain, input(img)?, 1e-6),
        ("deit3", [img]) => (
            Family {
                pos_embed: PosEmbed::PatchesOnly,
                ..layer_scale
            },
            input(img)?,
            1e-6,
        ),
        _ => return Err(unknown()),
    };
    let &(_, width, depth, heads) = TIMM_SIZES.iter().find(|s| s.0 == *size).ok_or_else(|| {
        let sizes: Vec<&str> = TIMM_SIZES.iter().map(|s| s.0).collect();
        format!(
            "its size {size:?} is not one of timm's {}",
            sizes.join(", ")
        )
    })?;
    Ok(TimmArchitecture {
        width,
        depth,
        heads,
        patch,
        image_size,
        family,
        ln_eps,
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

/// Three numbers of field `key` of `f`.
fn three(f: &Fields<'_>, key: &str) -> Result<Option<[f64; 3]>> {
    let Some(v) = f.map.get(key) else {
        return Ok(None);
    };
    let parsed = v
        .as_array()
        .filter(|a| a.len() == 3)
        .and_then(|a| Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?]));
    parsed
        .map(Some)
        .ok_or_else(|| f.bad(key, v, "three numbers (one per channel)"))
}

/// The preset of a mean and std given by fields `mean_key`, `std_key`:
/// an error naming them when they are none of the engine's.
fn stats(f: &Fields<'_>, mean_key: &str, std_key: &str) -> Result<Option<(Normalize, String)>> {
    let (Some(mean), Some(std)) = (three(f, mean_key)?, three(f, std_key)?) else {
        return Ok(None);
    };
    let said = format!("{}{mean_key} and {std_key}", f.prefix);
    match Normalize::from_stats(mean, std) {
        Some(n) => Ok(Some((n, format!("{} field {said}", f.file.display())))),
        None => {
            let names: Vec<&str> = Normalize::ALL.iter().map(|n| n.name()).collect();
            bail!(
                "{}: fields {said} = {mean:?}, {std:?} are none of the engine's normalizations ({}); normalize the data to one of them",
                f.file.display(),
                names.join(", ")
            )
        }
    }
}

/// timm: `pretrained_cfg.mean` and `.std`.
fn timm_normalize(f: &Fields<'_>) -> Result<Option<(Normalize, String)>> {
    match f.map.get("pretrained_cfg") {
        Some(Value::Object(pre)) => stats(
            &Fields {
                file: f.file,
                map: pre,
                prefix: "pretrained_cfg.",
            },
            "mean",
            "std",
        ),
        _ => Ok(None),
    }
}

/// Hugging Face: `image_mean` and `image_std` of the preprocessor_config.json
/// beside the config, else the image processor's default of the model type
/// (ViT: 0.5; DeiT and DINOv2: ImageNet's; CLIP: its own).
fn hf_normalize(config: &Path, model_type: &str) -> Result<Option<(Normalize, String)>> {
    let pre = config.with_file_name("preprocessor_config.json");
    if pre.is_file() {
        let text =
            std::fs::read_to_string(&pre).with_context(|| format!("reading {}", pre.display()))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{} is not JSON: {e}", pre.display()))?;
        if let Some(map) = json.as_object() {
            let fields = Fields {
                file: &pre,
                map,
                prefix: "",
            };
            if let Some(found) = stats(&fields, "image_mean", "image_std")? {
                return Ok(Some(found));
            }
        }
    }
    let default = match model_type {
        "vit" => Normalize::Half,
        "deit" | "dinov2" | "dinov2_with_registers" => Normalize::Imagenet,
        "clip_vision_model" => Normalize::Clip,
        _ => return Ok(None),
    };
    Ok(Some((
        default,
        format!(
            "{} field model_type = {model_type:?} (its image processor's default)",
            config.display()
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_names_fix_shape_and_family() {
        let b = timm_architecture("vit_base_patch16_224").unwrap();
        assert_eq!(
            (b.width, b.depth, b.heads, b.patch, b.image_size),
            (768, 12, 12, 16, 224)
        );
        assert!(b.family.is_plain());
        assert_eq!(timm_architecture("vit_huge_patch14_224").unwrap().heads, 16);
        let d = timm_architecture("vit_small_patch14_reg4_dinov2").unwrap();
        assert_eq!((d.width, d.heads, d.patch, d.image_size), (384, 6, 14, 518));
        assert_eq!(
            (d.family.registers, d.family.pos_embed, d.family.layer_scale),
            (4, PosEmbed::PatchesOnly, true)
        );
        let c = timm_architecture("vit_base_patch32_clip_quickgelu_224").unwrap();
        assert_eq!(
            (c.family.act, c.family.norm_pre, c.ln_eps),
            (Activation::QuickGelu, true, 1e-5)
        );
        let c = timm_architecture("vit_large_patch14_clip_336").unwrap();
        assert_eq!(
            (c.family.act, c.width, c.image_size),
            (Activation::Gelu, 1024, 336)
        );
        let t = timm_architecture("deit_tiny_distilled_patch16_224").unwrap();
        assert_eq!((t.width, t.family.pool), (192, Pool::Distilled));
        let m = timm_architecture("deit3_medium_patch16_224").unwrap();
        assert_eq!(
            (m.width, m.heads, m.family.pos_embed),
            (512, 8, PosEmbed::PatchesOnly)
        );
        let e = timm_architecture("vit_giant_patch14_dinov2").unwrap_err();
        assert!(e.contains("SwiGLU"), "{e}");
        for other in [
            "vit_medium_patch16_gap_256",
            "vit_base_patch16_224_miil",
            "vit_base_patch16_siglip_224",
            "deit3_small_distilled_patch16_224",
            "eva02_base_patch14_224",
        ] {
            assert!(timm_architecture(other).is_err(), "{other}");
        }
        let e = timm_architecture("vit_betwixt_patch32_clip_224").unwrap_err();
        assert!(e.contains("betwixt"), "{e}");
    }
}
