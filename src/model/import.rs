//! Loading checkpoints of other libraries: timm, torchvision and Hugging
//! Face ViTs, detected from their tensor names, into the engine's
//! `Checkpoint`, from safetensors files or PyTorch `.pth` files (the form
//! torchvision distributes its weights in).
//!
//! Each scheme is a renaming to the engine's names (`model::params`), fused
//! q/k/v matrices split into three layers:
//!
//! | engine | timm | torchvision `vit_b_32` | Hugging Face `ViTForImageClassification` |
//! |---|---|---|---|
//! | `cls_token` | `cls_token` | `class_token` | `vit.embeddings.cls_token` |
//! | `pos_embed` | `pos_embed` | `encoder.pos_embedding` | `vit.embeddings.position_embeddings` |
//! | `patch_embed.proj.*` | same | `conv_proj.*` | `vit.embeddings.patch_embeddings.projection.*` |
//! | `blocks.N.norm1.*` | same | `encoder.layers.encoder_layer_N.ln_1.*` | `vit.encoder.layer.N.layernorm_before.*` |
//! | `blocks.N.attn.{q,k,v}.*` | `blocks.N.attn.qkv.*` (fused) | `….self_attention.in_proj_{weight,bias}` (fused) | `….attention.attention.{query,key,value}.*` |
//! | `blocks.N.attn.proj.*` | same | `….self_attention.out_proj.*` | `….attention.output.dense.*` |
//! | `blocks.N.norm2.*` | same | `….ln_2.*` | `….layernorm_after.*` |
//! | `blocks.N.mlp.fc1.*` | same | `….mlp.0.*` (older: `mlp.linear_1`) | `….intermediate.dense.*` |
//! | `blocks.N.mlp.fc2.*` | same | `….mlp.3.*` (older: `mlp.linear_2`) | `….output.dense.*` |
//! | `norm.*` | same | `encoder.ln.*` | `vit.layernorm.*` |
//! | `head.*` | same | `heads.head.*` | `classifier.*` |
//!
//! LayerNorm epsilon: timm and torchvision 1e-6, Hugging Face 1e-12. A
//! Hugging Face `ViTModel` (no `vit.` prefix, no classifier) is accepted; its
//! pooler is not part of a class-token classifier and is ignored.
//! The shape comes from the tensors (width, depth, patch, image size from the
//! position embedding, MLP width, classes). The number of heads cannot be
//! read from them; it comes from, in order: the config.json of a hub folder
//! (or beside the file; `model::hub`, which also checks the shape it states
//! against the tensors), the architecture torchvision's shapes identify
//! (`vit_b_*` 12, `vit_l_*` 16, `vit_h_14` 16), `--heads`, else width / 64,
//! said on stderr (`ImportRecord::notices`) and recorded as guessed.
//! With `new_classes`, or when the file has no head, a fresh zero-initialized
//! head is attached (zeros: every class starts equal and the head learns
//! from the first step; the usual choice when fine-tuning on a new task).

use super::checkpoint::{
    load_checkpoint, no_leftovers, read_safetensors, take, Checkpoint, NamingScheme, RawTensor,
    FORMAT,
};
use super::config::VitConfig;
use super::hub::HubConfig;
use super::params::{dense_ranks, Linear, VitParams};
use super::pth::{looks_like_zip, read_pth};
use super::resample::{resample_pos_embed, GridResize};
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the tensors cannot say, from the command line.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Attention heads (`--heads`): needed only where neither a config.json
    /// nor the naming scheme fixes them; contradicting those is an error.
    pub heads: Option<usize>,
    /// Replace the head with a fresh one for this many classes.
    pub new_classes: Option<usize>,
    /// Run the model at this input size (`--input-size`, pixels), its
    /// position embedding resampled (`model::resample`).
    pub input_size: Option<usize>,
}

/// Where the number of attention heads came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadsFrom {
    /// The engine's own file records its config.
    Recorded,
    /// A field of the config.json beside the weights (named).
    Config(String),
    /// The architecture the tensor shapes identify (torchvision's five).
    Architecture(String),
    /// `--heads`.
    Flag,
    /// Nothing said it: width / 64, announced on stderr.
    Guessed,
}

/// How the position embedding was resampled to another input size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputResample {
    /// The input size the checkpoint was trained at (pixels).
    pub from: usize,
    /// The input size it runs at now.
    pub to: usize,
    pub method: String,
}

/// The method `InputResample::method` records (timm's default).
pub const RESAMPLE_METHOD: &str =
    "timm resample_abs_pos_embed: bicubic, align_corners=False, antialias=True, class token kept";

/// How a checkpoint was read: recorded in the run metadata of everything
/// made from it, because each of these changes results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportRecord {
    /// The file (or hub folder) given.
    pub source: String,
    pub naming: NamingScheme,
    /// The config.json read beside the weights, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The architecture it names (or that the shapes identify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    pub heads: usize,
    pub heads_from: HeadsFrom,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<InputResample>,
    /// Class names of the head (config.json `id2label` or `label_names`);
    /// None when the file has none or the head was replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
}

impl ImportRecord {
    /// What a user must be told on stderr: each setting that was guessed,
    /// with the flag that overrides it.
    pub fn notices(&self, width: usize) -> Vec<String> {
        let mut out = Vec::new();
        if self.heads_from == HeadsFrom::Guessed {
            out.push(format!(
                "warning: {}: the number of attention heads is not in the file; assuming {} (width {width} / 64, as ViT-S and ViT-B have). Give --heads N if it has another; a hub folder with its config.json says it",
                self.source, self.heads
            ));
        }
        out
    }

    /// A warning when the data names its classes otherwise than the head
    /// does (config.json `id2label`), index by index: the labels would be
    /// scored against other classes' logits.
    pub fn class_names_differ(&self, data: &[String]) -> Option<String> {
        let head = self.class_names.as_ref()?;
        let (i, (h, d)) = head
            .iter()
            .zip(data)
            .enumerate()
            .find(|(_, (h, d))| h != d)?;
        Some(format!(
            "warning: {}: class {i} of its head is {h:?} (as {} says), of the data {d:?}; labels are scored by index, so the data's classes must be the head's in its order",
            self.source,
            self.config.as_deref().unwrap_or("the checkpoint")
        ))
    }
}

/// Every tensor of a checkpoint file and its metadata: safetensors, or a
/// PyTorch `.pth` / `.pt` (`torch.save` of a state_dict, read by
/// `model::pth` without executing anything; it has no metadata).
pub fn read_tensors(
    path: &Path,
) -> Result<(BTreeMap<String, RawTensor>, BTreeMap<String, String>)> {
    let mut head = [0u8; 4];
    let is_torch_name = path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        e.eq_ignore_ascii_case("pth") || e.eq_ignore_ascii_case("pt") || e == "bin"
    });
    let zip = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && looks_like_zip(&head);
    if zip || is_torch_name {
        return Ok((read_pth(path)?, BTreeMap::new()));
    }
    read_safetensors(path)
}

/// The weights file of a hub folder (`model.safetensors`, else
/// `pytorch_model.bin`) and its config.json.
pub fn hub_folder_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let config = dir.join("config.json");
    if !config.is_file() {
        bail!("{} is a folder without a config.json; a checkpoint folder is one as the Hugging Face hub delivers it (config.json and model.safetensors)", dir.display());
    }
    for name in ["model.safetensors", "pytorch_model.bin"] {
        if dir.join(name).is_file() {
            return Ok((dir.join(name), config));
        }
    }
    if dir.join("model.safetensors.index.json").is_file() {
        bail!("{}: the weights are sharded (model.safetensors.index.json); sharded checkpoints are not read, a ViT this engine trains fits one file", dir.display());
    }
    bail!(
        "{}: no model.safetensors or pytorch_model.bin beside its config.json",
        dir.display()
    )
}

/// Load the engine's own files or a timm, torchvision or Hugging Face ViT:
/// a safetensors or PyTorch file, or a hub folder (config.json and the
/// weights). A file with a config.json beside it is read with it.
pub fn load_any(path: &Path, opts: &ImportOptions) -> Result<Checkpoint> {
    let (weights, config) = if path.is_dir() {
        let (w, c) = hub_folder_files(path)?;
        (w, Some(c))
    } else {
        let sibling = path.parent().map(|d| d.join("config.json"));
        (path.to_path_buf(), sibling.filter(|c| c.is_file()))
    };
    let (tensors, metadata) = read_tensors(&weights)?;
    if metadata.get("format").map(String::as_str) == Some(FORMAT) {
        let mut ck = load_checkpoint(&weights)?;
        if let Some(h) = opts.heads.filter(|&h| h != ck.cfg.heads) {
            bail!(
                "--heads {h}: {} records {} heads (an engine checkpoint says its own shape)",
                weights.display(),
                ck.cfg.heads
            );
        }
        if let Some(c) = opts.new_classes.filter(|&c| c != ck.cfg.classes) {
            replace_head(&mut ck.cfg, &mut ck.params, c);
        }
        if let Some(resample) = resample_input(&mut ck, opts.input_size, &weights)? {
            ck.import = Some(ImportRecord {
                source: path.display().to_string(),
                naming: NamingScheme::Engine,
                config: None,
                architecture: None,
                heads: ck.cfg.heads,
                heads_from: HeadsFrom::Recorded,
                input_size: Some(resample),
                class_names: None,
            });
        }
        return Ok(ck);
    }
    let scheme = detect(&tensors).ok_or_else(|| {
        let some: Vec<&String> = tensors.keys().take(5).collect();
        anyhow!("{}: tensor names match no known ViT naming (engine, timm, torchvision, Hugging Face); first names: {some:?}", weights.display())
    })?;
    let hub = config
        .as_deref()
        .map(|c| HubConfig::read(c, scheme))
        .transpose()?;
    let mut renamed = match scheme {
        NamingScheme::Timm => split_fused(
            tensors,
            "blocks.",
            |i| format!("blocks.{i}.attn.qkv"),
            &weights,
        )?,
        NamingScheme::Torchvision => from_torchvision(tensors, &weights)?,
        NamingScheme::HuggingFace => from_hugging_face(tensors),
        NamingScheme::Engine => unreachable!("engine files are loaded above"),
    };
    let ln_eps =
        hub.as_ref()
            .and_then(|h| h.ln_eps)
            .unwrap_or(if scheme == NamingScheme::HuggingFace {
                1e-12
            } else {
                1e-6
            });
    let shape = infer_shape(&renamed, &weights, opts, ln_eps)?;
    if let Some(h) = &hub {
        h.check(&shape, &weights)?;
    }
    let (heads, heads_from, architecture) = choose_heads(&shape, scheme, hub.as_ref(), opts.heads)?;
    let mut cfg = VitConfig { heads, ..shape };
    cfg.validate().map_err(|e| {
        let said_by = match &heads_from {
            HeadsFrom::Config(field) => format!(
                "{} field {field}",
                config.as_deref().unwrap_or(path).display()
            ),
            HeadsFrom::Architecture(name) => name.clone(),
            HeadsFrom::Flag => "--heads".into(),
            HeadsFrom::Guessed | HeadsFrom::Recorded => "width / 64".into(),
        };
        anyhow!(
            "{}: the shape {cfg:?} is not valid: {e} (heads from {said_by})",
            weights.display()
        )
    })?;
    let has_head = renamed.contains_key("head.weight");
    let wanted = opts
        .new_classes
        .or((!has_head).then_some(0))
        .filter(|&c| c != cfg.classes || !has_head);
    if let Some(c) = wanted {
        if c == 0 {
            bail!("{}: the checkpoint has no classification head; give the number of classes (train --init takes it from the data)", weights.display());
        }
        renamed.remove("head.weight");
        renamed.remove("head.bias");
        cfg.classes = c;
        renamed.insert(
            "head.weight".into(),
            RawTensor {
                shape: vec![c, cfg.width],
                data: vec![0.0; c * cfg.width],
            },
        );
        renamed.insert(
            "head.bias".into(),
            RawTensor {
                shape: vec![c],
                data: vec![0.0; c],
            },
        );
    }
    let ranks = dense_ranks(&cfg);
    let params = VitParams::build(&cfg, &ranks, |spec| {
        take(&mut renamed, &weights, &spec.name, &spec.shape)
    })?;
    no_leftovers(&renamed, &weights)?;
    let class_names = hub
        .as_ref()
        .and_then(|h| h.class_names.clone())
        .filter(|_| wanted.is_none());
    let mut ck = Checkpoint {
        cfg,
        ranks,
        params,
        metadata,
        scheme,
        import: None,
    };
    let input_size = resample_input(&mut ck, opts.input_size, &weights)?;
    ck.import = Some(ImportRecord {
        source: path.display().to_string(),
        naming: scheme,
        config: config.map(|c| c.display().to_string()),
        architecture,
        heads,
        heads_from,
        input_size,
        class_names,
    });
    Ok(ck)
}

/// Resample the position embedding of `ck` to `input_size` pixels when that
/// differs from its own (`model::resample`, as timm does).
fn resample_input(
    ck: &mut Checkpoint,
    input_size: Option<usize>,
    path: &Path,
) -> Result<Option<InputResample>> {
    let Some(to) = input_size.filter(|&s| s != ck.cfg.image_size) else {
        return Ok(None);
    };
    let patch = ck.cfg.patch;
    if to == 0 || !to.is_multiple_of(patch) {
        bail!("--input-size {to}: {} has patches of {patch} pixels; the input size must be a positive multiple of {patch}", path.display());
    }
    let from = ck.cfg.image_size;
    let grid = GridResize {
        from: from / patch,
        to: to / patch,
    };
    let mut cfg = ck.cfg.clone();
    cfg.image_size = to;
    cfg.validate()
        .map_err(|e| anyhow!("--input-size {to} for {}: {e}", path.display()))?;
    // The prefix rows of the position embedding (none when it covers the
    // patches only) are kept as they are.
    let prefix_rows = ck.cfg.pos_rows() - ck.cfg.n_patches();
    ck.params.pos = resample_pos_embed(&ck.params.pos, cfg.width, prefix_rows, grid, true)?;
    ck.cfg = cfg;
    Ok(Some(InputResample {
        from,
        to,
        method: RESAMPLE_METHOD.into(),
    }))
}

/// The torchvision architectures whose shapes (width, depth, MLP) fix their
/// heads: name and heads.
const TORCHVISION_SHAPES: &[((usize, usize, usize), &str, usize)] = &[
    ((768, 12, 3072), "vit_b_16 or vit_b_32", 12),
    ((1024, 24, 4096), "vit_l_16 or vit_l_32", 16),
    ((1280, 32, 5120), "vit_h_14", 16),
];

/// The torchvision architecture a shape identifies, and its heads.
pub fn torchvision_heads(width: usize, depth: usize, mlp: usize) -> Option<(&'static str, usize)> {
    TORCHVISION_SHAPES
        .iter()
        .find(|(shape, _, _)| *shape == (width, depth, mlp))
        .map(|&(_, name, heads)| (name, heads))
}

/// A head count that a config.json or the architecture fixes.
struct KnownHeads {
    heads: usize,
    from: HeadsFrom,
    architecture: Option<String>,
    /// What says it, for errors.
    said_by: String,
}

/// The number of heads, what says it and the architecture: config.json,
/// else the architecture torchvision's shapes identify, else `--heads`,
/// else width / 64 (guessed). `--heads` contradicting the first two is an
/// error.
fn choose_heads(
    shape: &VitConfig,
    scheme: NamingScheme,
    hub: Option<&HubConfig>,
    flag: Option<usize>,
) -> Result<(usize, HeadsFrom, Option<String>)> {
    let known = match hub {
        Some(h) => Some(KnownHeads {
            heads: h.heads,
            from: HeadsFrom::Config(h.heads_field.clone()),
            architecture: h.architecture.clone(),
            said_by: format!("{} field {}", h.file.display(), h.heads_field),
        }),
        None if scheme == NamingScheme::Torchvision => {
            torchvision_heads(shape.width, shape.depth, shape.mlp).map(|(name, heads)| {
                let name = format!("torchvision {name}");
                KnownHeads {
                    heads,
                    from: HeadsFrom::Architecture(name.clone()),
                    said_by: format!(
                        "{name} (the architecture of width {}, depth {} and MLP {})",
                        shape.width, shape.depth, shape.mlp
                    ),
                    architecture: Some(name),
                }
            })
        }
        None => None,
    };
    match (known, flag) {
        (Some(k), Some(f)) if f != k.heads => {
            bail!(
                "--heads {f} contradicts {}, which says {} heads",
                k.said_by,
                k.heads
            )
        }
        (Some(k), _) => Ok((k.heads, k.from, k.architecture)),
        (None, Some(f)) => Ok((f, HeadsFrom::Flag, None)),
        (None, None) => Ok(((shape.width / 64).max(1), HeadsFrom::Guessed, None)),
    }
}

fn replace_head(cfg: &mut VitConfig, params: &mut VitParams<Vec<f32>>, classes: usize) {
    cfg.classes = classes;
    let fresh = |inputs: usize| Linear::Dense {
        weight: vec![0.0; classes * inputs],
        bias: Some(vec![0.0; classes]),
    };
    params.head = fresh(cfg.family.pool.head_inputs(cfg.width));
    if params.head_dist.is_some() {
        params.head_dist = Some(fresh(cfg.width));
    }
}

/// The naming scheme of a foreign file, from marker tensors.
pub fn detect(tensors: &BTreeMap<String, RawTensor>) -> Option<NamingScheme> {
    let has = |k: &str| tensors.contains_key(k);
    if has("cls_token") && has("pos_embed") && has("patch_embed.proj.weight") {
        Some(NamingScheme::Timm)
    } else if has("class_token") && has("conv_proj.weight") {
        Some(NamingScheme::Torchvision)
    } else if has("vit.embeddings.cls_token") || has("embeddings.cls_token") {
        Some(NamingScheme::HuggingFace)
    } else {
        None
    }
}

/// Split every `<prefix>.weight` `[3D, D]` / `.bias` `[3D]` of block `i`
/// (named by `fused_name(i)`) into `blocks.i.attn.{q,k,v}.*`.
fn split_fused(
    mut tensors: BTreeMap<String, RawTensor>,
    block_prefix: &str,
    fused_name: impl Fn(usize) -> String,
    path: &Path,
) -> Result<BTreeMap<String, RawTensor>> {
    let depth = count_blocks(&tensors, block_prefix);
    for i in 0..depth {
        let base = fused_name(i);
        for (suffix, is_weight) in [("weight", true), ("bias", false)] {
            let name = format!("{base}.{suffix}");
            let Some(t) = tensors.remove(&name) else {
                bail!("{}: missing tensor {name}", path.display());
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
fn count_blocks(tensors: &BTreeMap<String, RawTensor>, prefix: &str) -> usize {
    tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|i| i.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Rename keys by (old prefix, new prefix) pairs, block index substituted.
fn rename(
    tensors: BTreeMap<String, RawTensor>,
    rule: impl Fn(&str) -> Option<String>,
) -> BTreeMap<String, RawTensor> {
    tensors
        .into_iter()
        .map(|(k, v)| (rule(&k).unwrap_or(k), v))
        .collect()
}

fn from_torchvision(
    tensors: BTreeMap<String, RawTensor>,
    path: &Path,
) -> Result<BTreeMap<String, RawTensor>> {
    const LAYER: &str = "encoder.layers.encoder_layer_";
    let renamed = rename(tensors, |k| {
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
    });
    split_fused(renamed, "blocks.", |i| format!("blocks.{i}.attn.qkv"), path)
}

fn from_hugging_face(tensors: BTreeMap<String, RawTensor>) -> BTreeMap<String, RawTensor> {
    let prefix = if tensors.contains_key("vit.embeddings.cls_token") {
        "vit."
    } else {
        ""
    };
    let mut renamed = rename(tensors, |k| {
        if k == "classifier.weight" || k == "classifier.bias" {
            return Some(k.replace("classifier", "head"));
        }
        let k = k.strip_prefix(prefix)?;
        let fixed = match k {
            "embeddings.cls_token" => "cls_token",
            "embeddings.position_embeddings" => "pos_embed",
            "embeddings.patch_embeddings.projection.weight" => "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias" => "patch_embed.proj.bias",
            "layernorm.weight" => "norm.weight",
            "layernorm.bias" => "norm.bias",
            _ => "",
        };
        if !fixed.is_empty() {
            return Some(fixed.to_string());
        }
        let rest = k.strip_prefix("encoder.layer.")?;
        let (i, tail) = rest.split_once('.')?;
        let (module, param) = tail.rsplit_once('.')?;
        let new_module = match module {
            "layernorm_before" => "norm1",
            "layernorm_after" => "norm2",
            "attention.attention.query" => "attn.q",
            "attention.attention.key" => "attn.k",
            "attention.attention.value" => "attn.v",
            "attention.output.dense" => "attn.proj",
            "intermediate.dense" => "mlp.fc1",
            "output.dense" => "mlp.fc2",
            _ => return None,
        };
        Some(format!("blocks.{i}.{new_module}.{param}"))
    });
    // The pooler (dense + tanh on the class token) is not part of the
    // class-token classifier; drop it.
    renamed.retain(|k, _| !k.contains("pooler."));
    renamed
}

/// The model shape from renamed tensors; `heads` is left at 1 (the
/// tensors cannot say it: `choose_heads`).
fn infer_shape(
    t: &BTreeMap<String, RawTensor>,
    path: &Path,
    opts: &ImportOptions,
    ln_eps: f32,
) -> Result<VitConfig> {
    let shape = |name: &str| -> Result<&Vec<usize>> {
        t.get(name)
            .map(|x| &x.shape)
            .ok_or_else(|| anyhow!("{}: missing tensor {name}", path.display()))
    };
    let pw = shape("patch_embed.proj.weight")?;
    if pw.len() != 4 || pw[2] != pw[3] {
        bail!("{}: tensor patch_embed.proj.weight has shape {pw:?}, expected [width, channels, patch, patch]", path.display());
    }
    let (width, channels, patch) = (pw[0], pw[1], pw[2]);
    let pos = shape("pos_embed")?;
    let tokens = *pos.get(1).ok_or_else(|| {
        anyhow!(
            "{}: tensor pos_embed has shape {pos:?}, expected [1, tokens, width]",
            path.display()
        )
    })?;
    let grid = ((tokens.saturating_sub(1)) as f64).sqrt().round() as usize;
    if grid * grid + 1 != tokens {
        bail!(
            "{}: position embedding of {tokens} tokens is not a square grid plus a class token",
            path.display()
        );
    }
    let depth = count_blocks(t, "blocks.");
    if depth == 0 {
        bail!("{}: no transformer blocks found", path.display());
    }
    let mlp = shape("blocks.0.mlp.fc1.weight")?[0];
    let classes = t
        .get("head.weight")
        .map(|h| h.shape[0])
        .unwrap_or(opts.new_classes.unwrap_or(0));
    let cfg = VitConfig {
        image_size: grid * patch,
        channels,
        patch,
        width,
        depth,
        heads: 1,
        mlp,
        classes: classes.max(1),
        ln_eps,
        family: Default::default(),
    };
    cfg.validate().map_err(|e| {
        anyhow!(
            "{}: inferred shape {cfg:?} is not valid: {e}",
            path.display()
        )
    })?;
    Ok(cfg)
}
