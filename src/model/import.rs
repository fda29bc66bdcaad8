//! Loading checkpoints of other libraries: timm, torchvision and Hugging
//! Face ViTs of every family the engine computes (`model::family`: DeiT
//! with or without distillation, DeiT-III, DINOv2 with or without
//! registers, CLIP, average pooling...), into the engine's `Checkpoint`,
//! from safetensors files, PyTorch `.pth` files (the form torchvision
//! distributes its weights in) or hub folders (config.json beside the
//! weights, `model::hub`).
//!
//! The renaming of each library's tensors is `model::rename`. The model
//! then comes from the tensors:
//! - the shape: width, depth, patch, MLP, classes, and the input size from
//!   the position embedding's grid;
//! - the family: a class token (`cls_token`), a distillation token
//!   (`dist_token`), registers (`reg_token`), a position embedding over the
//!   prefix tokens and patches or over the patches only (which rows fit a
//!   square grid; where both do, the config.json decides), biases of the
//!   patch embedding and of q, k, v, `norm_pre`, LayerScale (`ls1.gamma`,
//!   `ls2.gamma` in every block or in none), and the pooling: `head_dist`
//!   is DeiT's distilled pair, `fc_norm` average pooling, a head over twice
//!   the width Dinov2's class token and mean, else the class token.
//!
//! What the tensors cannot say comes from, in order: the config.json of a
//! hub folder (or beside the file; it is also checked against the
//! tensors), what the naming scheme fixes, the flags, else a guess said on
//! stderr (`ImportRecord::notices`) and recorded:
//! - heads: config.json; the architecture torchvision's shapes identify
//!   (`vit_b_*` 12, `vit_l_*` 16, `vit_h_14` 16); `--heads`; width / 64.
//! - activation: config.json (`hidden_act`, timm's architecture name or
//!   `act_layer`); torchvision's (exact GELU); `--act`; else exact GELU,
//!   or for a CLIP-shaped file (a `norm_pre`) the library's default for
//!   CLIP, guessed: timm's `vit_*_clip_*` GELU, transformers' QuickGELU.
//! - LayerNorm epsilon: config.json, else the library's default for the
//!   family: timm and torchvision 1e-6 (timm's CLIP 1e-5), Hugging Face
//!   ViT and DeiT 1e-12, Dinov2 1e-6, CLIP 1e-5.
//!
//! With `new_classes`, or when the file has no head (Hugging Face's
//! `Dinov2Model`, `CLIPVisionModel`), a fresh zero-initialized head is
//! attached (zeros: every class starts equal and the head learns from the
//! first step; the usual choice when fine-tuning on a new task).

use super::checkpoint::{
    load_checkpoint, no_leftovers, read_safetensors, take, Checkpoint, NamingScheme, RawTensor,
    FORMAT,
};
use super::config::VitConfig;
use super::family::{Family, Pool, PosEmbed};
use super::hub::HubConfig;
use super::params::{dense_ranks, VitParams};
use super::pth::{looks_like_zip, read_pth};
use super::rename::{count_blocks, detect, to_engine_names, HfModel, Layout};
use super::resample::{resample_pos_embed, GridResize};
use crate::data::Normalize;
use crate::ops::gelu::Activation;
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
    /// The MLP's activation (`--act`): likewise.
    pub act: Option<Activation>,
    /// Replace the head with a fresh one for this many classes.
    pub new_classes: Option<usize>,
    /// Run the model at this input size (`--input-size`, pixels), its
    /// position embedding resampled (`model::resample`).
    pub input_size: Option<usize>,
}

/// Where a setting the tensors cannot say (the number of heads, the
/// activation) came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SaidBy {
    /// The engine's own file records its config.
    Recorded,
    /// A field of the config.json beside the weights (named).
    Config(String),
    /// The architecture the tensor shapes identify (torchvision's five).
    Architecture(String),
    /// The flag (`--heads`, `--act`).
    Flag,
    /// The only choice of the naming scheme for this family (exact GELU
    /// for a timm or Hugging Face ViT, DeiT or DINOv2); records written
    /// before the activation was recorded read as this.
    #[default]
    Scheme,
    /// Nothing said it: a guess, announced on stderr.
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
    "timm resample_abs_pos_embed: bicubic, align_corners=False, antialias=True, prefix tokens kept";

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
    pub heads_from: SaidBy,
    /// The MLP's activation and where it came from.
    #[serde(default)]
    pub act: Activation,
    #[serde(default)]
    pub act_from: SaidBy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_size: Option<InputResample>,
    /// Class names of the head (config.json `id2label` or `label_names`);
    /// None when the file has none or the head was replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_names: Option<Vec<String>>,
    /// The input normalization the weights expect, and what said it (a
    /// config field, or the family, guessed and announced); None: the
    /// naming scheme's default (`NamingScheme::default_normalize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize_from: Option<String>,
}

impl ImportRecord {
    /// What a user must be told on stderr: each setting that was guessed,
    /// with the flag that overrides it.
    pub fn notices(&self, width: usize) -> Vec<String> {
        let mut out = Vec::new();
        if self.heads_from == SaidBy::Guessed {
            out.push(format!(
                "warning: {}: the number of attention heads is not in the file; assuming {} (width {width} / 64, as ViT-S and ViT-B have). Give --heads N if it has another; a hub folder with its config.json says it",
                self.source, self.heads
            ));
        }
        if let (Some(n), Some(from)) = (self.normalize, &self.normalize_from) {
            if from.starts_with(GUESSED) {
                out.push(format!(
                    "warning: {}: the input normalization is not in the file; assuming {n} ({from}). Give --normalize if it was trained with another; a hub folder with its config says it",
                    self.source
                ));
            }
        }
        if self.act_from == SaidBy::Guessed {
            out.push(format!(
                "warning: {}: the MLP's activation is not in the file, and CLIP models come with either; assuming {} ({}). Give --act gelu, --act gelu-tanh or --act quick-gelu if it has another (OpenAI's CLIP weights: quick-gelu); a hub folder with its config.json says it",
                self.source,
                self.act.name(),
                match self.naming {
                    NamingScheme::HuggingFace => "transformers' default for CLIP",
                    _ => "timm's vit_*_clip_* models have it",
                }
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
        return load_engine_file(path, &weights, opts);
    }
    let layout = detect(&tensors).ok_or_else(|| {
        let some: Vec<&String> = tensors.keys().take(5).collect();
        anyhow!("{}: tensor names match no known ViT naming (engine, timm, torchvision, Hugging Face); first names: {some:?}", weights.display())
    })?;
    let hub = config
        .as_deref()
        .map(|c| HubConfig::read(c, &layout))
        .transpose()?;
    let mut renamed = to_engine_names(tensors, &layout, &weights)?;
    let ln_eps = hub
        .as_ref()
        .and_then(|h| h.ln_eps)
        .unwrap_or_else(|| default_ln_eps(&layout, renamed.contains_key("norm_pre.weight")));
    let pos_hint = hub.as_ref().and_then(HubConfig::pos_embed);
    let shape = infer_shape(&renamed, &weights, opts, ln_eps, pos_hint)?;
    if let Some(h) = &hub {
        h.check(&shape, &weights)?;
    }
    let scheme = layout.scheme();
    let (heads, heads_from, architecture) = choose_heads(&shape, scheme, hub.as_ref(), opts.heads)?;
    let (act, act_from) = choose_act(&shape.family, &layout, hub.as_ref(), opts.act)?;
    let mut cfg = VitConfig {
        heads,
        family: Family {
            act,
            ..shape.family
        },
        ..shape
    };
    cfg.validate().map_err(|e| {
        let said_by = match &heads_from {
            SaidBy::Config(field) => format!(
                "{} field {field}",
                config.as_deref().unwrap_or(path).display()
            ),
            SaidBy::Architecture(name) => name.clone(),
            SaidBy::Flag => "--heads".into(),
            SaidBy::Guessed | SaidBy::Recorded | SaidBy::Scheme => "width / 64".into(),
        };
        anyhow!(
            "{}: the shape {cfg:?} is not valid: {e} (heads from {said_by})",
            weights.display()
        )
    })?;
    let fresh = fresh_head(&mut cfg, &mut renamed, opts.new_classes, &weights)?;
    let ranks = dense_ranks(&cfg);
    let params = VitParams::build(&cfg, &ranks, |spec| {
        if fresh && is_head(&spec.name) {
            Ok(vec![0.0; spec.numel()])
        } else {
            take(&mut renamed, &weights, &spec.name, &spec.shape)
        }
    })?;
    no_leftovers(&renamed, &weights)?;
    let class_names = hub
        .as_ref()
        .and_then(|h| h.class_names.clone())
        .filter(|_| !fresh);
    let mut ck = Checkpoint {
        cfg,
        ranks,
        params,
        metadata,
        scheme,
        import: None,
    };
    let input_size = resample_input(&mut ck, opts.input_size, &weights)?;
    let (normalize, normalize_from) = hub
        .as_ref()
        .and_then(|h| h.normalize.clone())
        .or_else(|| family_normalize(&ck.cfg.family))
        .unzip();
    ck.import = Some(ImportRecord {
        source: path.display().to_string(),
        naming: scheme,
        config: config.map(|c| c.display().to_string()),
        architecture,
        heads,
        heads_from,
        act,
        act_from,
        input_size,
        class_names,
        normalize,
        normalize_from,
    });
    Ok(ck)
}

/// How `normalize_from` begins for a normalization guessed from the family.
const GUESSED: &str = "guessed";

/// The normalization a file without a config is taken to expect, from its
/// family: the libraries' DeiT (distilled), DeiT-III and DINOv2 weights
/// were trained on ImageNet's statistics, CLIP's on its own; None for the
/// plain ViT (the naming scheme's default).
fn family_normalize(f: &Family) -> Option<(Normalize, String)> {
    let (n, which) = if f.norm_pre {
        (Normalize::Clip, "CLIP image towers")
    } else if f.layer_scale || f.dist_token || f.registers > 0 {
        (Normalize::Imagenet, "DeiT, DeiT-III and DINOv2 weights")
    } else {
        return None;
    };
    Some((n, format!("{GUESSED} from the family: {which} use it")))
}

/// One of the engine's own files, its head replaced and its input size
/// changed as `opts` say; the flags must agree with what it records.
fn load_engine_file(path: &Path, weights: &Path, opts: &ImportOptions) -> Result<Checkpoint> {
    let mut ck = load_checkpoint(weights)?;
    if let Some(h) = opts.heads.filter(|&h| h != ck.cfg.heads) {
        bail!(
            "--heads {h}: {} records {} heads (an engine checkpoint says its own shape)",
            weights.display(),
            ck.cfg.heads
        );
    }
    let recorded = ck.cfg.family.act;
    if let Some(a) = opts.act.filter(|&a| a != recorded) {
        bail!(
            "--act {}: {} records the activation {} (an engine checkpoint says its own model)",
            a.name(),
            weights.display(),
            recorded.name()
        );
    }
    if let Some(c) = opts.new_classes.filter(|&c| c != ck.cfg.classes) {
        let mut cfg = ck.cfg.clone();
        cfg.classes = c;
        ck.params = ck.params.map(&cfg, &ck.ranks, |spec, t| {
            Ok::<_, anyhow::Error>(if is_head(&spec.name) {
                vec![0.0; spec.numel()]
            } else {
                t.clone()
            })
        })?;
        ck.cfg = cfg;
    }
    if let Some(resample) = resample_input(&mut ck, opts.input_size, weights)? {
        ck.import = Some(ImportRecord {
            source: path.display().to_string(),
            naming: NamingScheme::Engine,
            config: None,
            architecture: None,
            heads: ck.cfg.heads,
            heads_from: SaidBy::Recorded,
            act: recorded,
            act_from: SaidBy::Recorded,
            input_size: Some(resample),
            class_names: None,
            // The engine's file records its own normalization.
            normalize: None,
            normalize_from: None,
        });
    }
    Ok(ck)
}

/// A checkpoint without a classification head (Hugging Face's
/// `Dinov2Model`, `CLIPVisionModel`) loaded without `new_classes`: the
/// error, typed so that a caller who learns the classes later can ask
/// again.
#[derive(Debug)]
pub struct NoHead(pub PathBuf);

impl std::fmt::Display for NoHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: the checkpoint has no classification head; give the number of classes (train --init takes it from the data)", self.0.display())
    }
}

impl std::error::Error for NoHead {}

/// A tensor of the classification heads (`head.*`, `head_dist.*`), which a
/// fresh head makes zeros.
fn is_head(name: &str) -> bool {
    name.starts_with("head.") || name.starts_with("head_dist.")
}

/// Whether the heads are to be fresh (zeros): with `new_classes` other than
/// the file's, or when the file has none (then `new_classes` is needed).
/// Sets the classes of `cfg` and takes the file's heads out of `tensors`.
fn fresh_head(
    cfg: &mut VitConfig,
    tensors: &mut BTreeMap<String, RawTensor>,
    new_classes: Option<usize>,
    path: &Path,
) -> Result<bool> {
    let has_head = tensors.contains_key("head.weight");
    let wanted = new_classes
        .or((!has_head).then_some(0))
        .filter(|&c| c != cfg.classes || !has_head);
    let Some(classes) = wanted else {
        return Ok(false);
    };
    if classes == 0 {
        return Err(NoHead(path.to_path_buf()).into());
    }
    cfg.classes = classes;
    tensors.retain(|name, _| !is_head(name));
    Ok(true)
}

/// Resample the position embedding of `ck` to `input_size` pixels when that
/// differs from its own (`model::resample`, as timm does: the prefix rows it
/// has are kept).
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
    let prefix_rows = ck.cfg.pos_rows() - ck.cfg.n_patches();
    let mut cfg = ck.cfg.clone();
    cfg.image_size = to;
    cfg.validate()
        .map_err(|e| anyhow!("--input-size {to} for {}: {e}", path.display()))?;
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

/// A setting that a config.json or the architecture fixes.
struct Known<T> {
    value: T,
    from: SaidBy,
    architecture: Option<String>,
    /// What says it, for errors.
    said_by: String,
}

/// The known value, else the flag's, else the guess; a flag that
/// contradicts the known value is an error.
fn decide<T: PartialEq + Copy>(
    known: Option<Known<T>>,
    flag: Option<T>,
    guess: (T, SaidBy),
    contradiction: impl Fn(T, T, &str) -> String,
) -> Result<(T, SaidBy, Option<String>)> {
    match (known, flag) {
        (Some(k), Some(f)) if f != k.value => bail!(contradiction(f, k.value, &k.said_by)),
        (Some(k), _) => Ok((k.value, k.from, k.architecture)),
        (None, Some(f)) => Ok((f, SaidBy::Flag, None)),
        (None, None) => Ok((guess.0, guess.1, None)),
    }
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
) -> Result<(usize, SaidBy, Option<String>)> {
    let known = match hub {
        Some(h) => Some(Known {
            value: h.heads,
            from: SaidBy::Config(h.heads_field.clone()),
            architecture: h.architecture.clone(),
            said_by: format!("{} field {}", h.file.display(), h.heads_field),
        }),
        None if scheme == NamingScheme::Torchvision => {
            torchvision_heads(shape.width, shape.depth, shape.mlp).map(|(name, heads)| {
                let name = format!("torchvision {name}");
                Known {
                    value: heads,
                    from: SaidBy::Architecture(name.clone()),
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
    let guess = ((shape.width / 64).max(1), SaidBy::Guessed);
    decide(known, flag, guess, |f, k, said_by| {
        format!("--heads {f} contradicts {said_by}, which says {k} heads")
    })
}

/// The MLP's activation and what says it: config.json, else torchvision's
/// (exact GELU), else `--act`, else the library's default; that is a guess
/// for a CLIP-shaped file (`norm_pre`), CLIP models coming with either
/// GELU or QuickGELU. `--act` contradicting the first two is an error.
fn choose_act(
    family: &Family,
    layout: &Layout,
    hub: Option<&HubConfig>,
    flag: Option<Activation>,
) -> Result<(Activation, SaidBy)> {
    let known = match (hub.and_then(|h| h.act.clone().map(|a| (h, a))), layout) {
        (Some((h, (act, field))), _) => Some(Known {
            value: act,
            said_by: format!("{} field {field}", h.file.display()),
            from: SaidBy::Config(field),
            architecture: None,
        }),
        (None, Layout::Torchvision) => Some(Known {
            value: Activation::Gelu,
            from: SaidBy::Architecture("torchvision VisionTransformer".into()),
            said_by: "torchvision's VisionTransformer (nn.GELU)".into(),
            architecture: None,
        }),
        (None, _) => None,
    };
    let guess = match (family.norm_pre, layout.hf_model()) {
        (true, Some(HfModel::Clip)) => (Activation::QuickGelu, SaidBy::Guessed),
        (true, _) => (Activation::Gelu, SaidBy::Guessed),
        (false, _) => (Activation::Gelu, SaidBy::Scheme),
    };
    let (act, from, _) = decide(known, flag, guess, |f, k, said_by| {
        format!(
            "--act {} contradicts {said_by}, which says {}",
            f.name(),
            k.name()
        )
    })?;
    Ok((act, from))
}

/// The LayerNorm epsilon a library's model of this layout has by default
/// (`norm_pre`: a CLIP).
fn default_ln_eps(layout: &Layout, norm_pre: bool) -> f32 {
    match layout {
        Layout::Timm if norm_pre => 1e-5,
        Layout::Timm | Layout::Torchvision => 1e-6,
        Layout::HuggingFace { model, .. } => match model {
            HfModel::Vit => 1e-12,
            HfModel::Dinov2 => 1e-6,
            HfModel::Clip => 1e-5,
        },
    }
}

/// The model from renamed tensors (module doc); `heads` is left at 1 (the
/// tensors cannot say it: `choose_heads`) and the activation at GELU
/// (`choose_act`). `pos_hint` decides a position embedding that fits both
/// readings.
fn infer_shape(
    t: &BTreeMap<String, RawTensor>,
    path: &Path,
    opts: &ImportOptions,
    ln_eps: f32,
    pos_hint: Option<PosEmbed>,
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
    let depth = count_blocks(t, "blocks.");
    if depth == 0 {
        bail!("{}: no transformer blocks found", path.display());
    }
    let mlp = plain_mlp(t, path)?;
    let mut family = infer_family(t, path, width, depth)?;
    let pos = shape("pos_embed")?;
    let rows = *pos.get(1).ok_or_else(|| {
        anyhow!(
            "{}: tensor pos_embed has shape {pos:?}, expected [1, tokens, width]",
            path.display()
        )
    })?;
    let (grid, pos_embed) = pos_grid(rows, family.prefix_tokens(), pos_hint, path)?;
    family.pos_embed = pos_embed;
    let classes = t
        .get("head.weight")
        .and_then(|h| h.shape.first().copied())
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
        family,
    };
    cfg.validate().map_err(|e| {
        anyhow!(
            "{}: inferred shape {cfg:?} is not valid: {e}",
            path.display()
        )
    })?;
    Ok(cfg)
}

/// The MLP width: fc1's outputs, which must be fc2's inputs (a gated
/// MLP, SwiGLU, has other shapes or names).
fn plain_mlp(t: &BTreeMap<String, RawTensor>, path: &Path) -> Result<usize> {
    let gated = "a gated (SwiGLU) MLP, which the engine does not compute (it computes fc1, an activation, fc2)";
    if t.contains_key("blocks.0.mlp.fc1_g.weight") {
        bail!(
            "{}: tensor blocks.0.mlp.fc1_g.weight is of {gated}",
            path.display()
        );
    }
    let get = |name: &str| {
        t.get(name)
            .map(|x| x.shape.clone())
            .ok_or_else(|| anyhow!("{}: missing tensor {name}", path.display()))
    };
    let (fc1, fc2) = (
        get("blocks.0.mlp.fc1.weight")?,
        get("blocks.0.mlp.fc2.weight")?,
    );
    if fc1.len() != 2 || fc2.len() != 2 {
        bail!(
            "{}: tensors blocks.0.mlp.fc1.weight {fc1:?} and fc2.weight {fc2:?} are not matrices",
            path.display()
        );
    }
    if fc1[0] != fc2[1] {
        bail!(
            "{}: tensor blocks.0.mlp.fc1.weight has {} outputs but fc2.weight {} inputs: {gated}",
            path.display(),
            fc1[0],
            fc2[1]
        );
    }
    Ok(fc1[0])
}

/// The family from the tensors present (module doc), but for the position
/// embedding's rows (`pos_grid`) and the activation.
fn infer_family(
    t: &BTreeMap<String, RawTensor>,
    path: &Path,
    width: usize,
    depth: usize,
) -> Result<Family> {
    let has = |k: &str| t.contains_key(k);
    let registers = match t.get("reg_token") {
        None => 0,
        Some(r) if r.shape.len() == 3 && r.shape[0] == 1 && r.shape[2] == width => r.shape[1],
        Some(r) => bail!(
            "{}: tensor reg_token has shape {:?}, expected [1, registers, {width}]",
            path.display(),
            r.shape
        ),
    };
    if has("fc_norm.weight") && has("norm.weight") {
        bail!("{}: both norm and fc_norm: a LayerNorm before and after average pooling, which the engine does not compute (timm's average pooling has fc_norm only)", path.display());
    }
    let head_inputs = t.get("head.weight").and_then(|h| h.shape.get(1).copied());
    let pool = if has("head_dist.weight") {
        Pool::Distilled
    } else if has("fc_norm.weight") {
        Pool::Average
    } else if head_inputs == Some(2 * width) {
        Pool::ClassAndMean
    } else {
        Pool::Class
    };
    Ok(Family {
        class_token: has("cls_token"),
        dist_token: has("dist_token"),
        registers,
        pos_embed: PosEmbed::AllTokens,
        patch_bias: has("patch_embed.proj.bias"),
        qkv_bias: has("blocks.0.attn.q.bias"),
        norm_pre: has("norm_pre.weight"),
        layer_scale: layer_scale(t, path, depth)?,
        pool,
        act: Activation::Gelu,
    })
}

/// Whether the blocks have LayerScale: both gammas in every block, or none
/// in any (one missing is an error naming it).
fn layer_scale(t: &BTreeMap<String, RawTensor>, path: &Path, depth: usize) -> Result<bool> {
    let names = || {
        (0..depth).flat_map(|i| {
            [
                format!("blocks.{i}.ls1.gamma"),
                format!("blocks.{i}.ls2.gamma"),
            ]
        })
    };
    let Some(present) = names().find(|n| t.contains_key(n)) else {
        return Ok(false);
    };
    if let Some(missing) = names().find(|n| !t.contains_key(n)) {
        bail!("{}: LayerScale tensor {missing} is missing, but {present} is there: a model with LayerScale has both of every block (timm's blocks.N.ls1.gamma and ls2.gamma, Hugging Face's encoder.layer.N.layer_scale1.lambda1 and layer_scale2.lambda1)", path.display());
    }
    Ok(true)
}

/// The patch grid of a position embedding of `rows` rows with `prefix`
/// tokens in front of the patches, and which tokens it covers: every token
/// (rows = prefix + grid²) or the patches only (rows = grid²). Where both
/// fit, `hint` (the config.json's) decides; with no prefix tokens the two
/// are one model.
fn pos_grid(
    rows: usize,
    prefix: usize,
    hint: Option<PosEmbed>,
    path: &Path,
) -> Result<(usize, PosEmbed)> {
    let square = |n: usize| {
        let g = (n as f64).sqrt().round() as usize;
        (g > 0 && g * g == n).then_some(g)
    };
    let all = rows.checked_sub(prefix).and_then(square);
    let patches = square(rows).filter(|_| prefix > 0);
    match (all, patches) {
        (Some(g), None) => Ok((g, hint.filter(|_| prefix == 0).unwrap_or(PosEmbed::AllTokens))),
        (None, Some(g)) => Ok((g, PosEmbed::PatchesOnly)),
        (Some(a), Some(p)) => match hint {
            Some(PosEmbed::AllTokens) => Ok((a, PosEmbed::AllTokens)),
            Some(PosEmbed::PatchesOnly) => Ok((p, PosEmbed::PatchesOnly)),
            None => bail!("{}: position embedding of {rows} rows fits both a {a} x {a} grid after the {prefix} prefix tokens and a {p} x {p} grid of the patches alone; a config.json beside it says which (timm's no_embed_class)", path.display()),
        },
        (None, None) => bail!(
            "{}: position embedding of {rows} tokens is neither a square grid plus the {prefix} prefix tokens nor a square grid of the patches alone",
            path.display()
        ),
    }
}
