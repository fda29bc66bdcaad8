//! The engine's own checkpoints: safetensors with timm's tensor names.
//!
//! | tensor | shape | note |
//! |---|---|---|
//! | `patch_embed.proj.weight`, `.bias` | `[D, C, P, P]`, `[D]` | |
//! | `cls_token`, `pos_embed` | `[1, 1, D]`, `[1, T, D]` | |
//! | `blocks.N.norm1.*`, `blocks.N.norm2.*` | `[D]` | |
//! | `blocks.N.attn.qkv.weight`, `.bias` | `[3D, D]`, `[3D]` | dense q, k, v fused (rows q, k, v), as timm stores them |
//! | `blocks.N.attn.{q,k,v}.U`, `.V`, `.bias` | `[D, r]`, `[r, D]`, `[D]` | low-rank q, k, v, each its own layer |
//! | `blocks.N.attn.proj.weight` or `.U`/`.V`, `.bias` | | dense or low-rank |
//! | `blocks.N.mlp.fc1.*`, `blocks.N.mlp.fc2.*` | | dense or low-rank |
//! | `norm.weight`, `norm.bias`, `head.weight`, `head.bias` | | |
//!
//! A dense checkpoint is therefore exactly a timm `VisionTransformer`
//! state dict. The safetensors metadata holds `format = effrank-engine`,
//! `config` (the `VitConfig` as JSON), `ranks` (JSON, per block the ranks of
//! q, k, v, proj, fc1, fc2; null = dense) and whatever the writer adds
//! (`normalize`, `role`, `epoch`, metrics). Files are written atomically.
//! When q, k and v of a block are all dense they are fused on disk; a block
//! whose q, k, v mix dense and low-rank stores the dense ones as
//! `blocks.N.attn.{q,k,v}.weight`.

use super::config::VitConfig;
use super::params::{param_specs, BlockLinear, Ranks, VitParams};
use crate::durable::atomic_write_with;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Metadata value of `format` in the engine's files.
pub const FORMAT: &str = "effrank-engine";

/// Which library's tensor names a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NamingScheme {
    Engine,
    Timm,
    Torchvision,
    HuggingFace,
}

impl NamingScheme {
    /// The input normalization each library's ViT-B/32 weights expect
    /// (`None`: the file does not say; the engine's own files record it).
    pub fn default_normalize(self) -> Option<crate::data::Normalize> {
        use crate::data::Normalize;
        match self {
            NamingScheme::Engine => None,
            NamingScheme::Timm | NamingScheme::HuggingFace => Some(Normalize::Half),
            NamingScheme::Torchvision => Some(Normalize::Imagenet),
        }
    }
}

/// A model on the host, with where it came from.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub cfg: VitConfig,
    pub ranks: Ranks,
    pub params: VitParams<Vec<f32>>,
    pub metadata: BTreeMap<String, String>,
    pub scheme: NamingScheme,
    /// How an imported (or resampled) checkpoint was read.
    pub import: Option<super::import::ImportRecord>,
}

/// True when q, k and v of block `i` are all dense (fused on disk).
fn qkv_fused(ranks: &Ranks, i: usize) -> bool {
    [BlockLinear::Q, BlockLinear::K, BlockLinear::V]
        .iter()
        .all(|&l| ranks[i][l].is_none())
}

/// The on-disk tensors of a model: (name, shape, values).
pub fn disk_tensors<'a>(
    cfg: &VitConfig,
    ranks: &Ranks,
    params: &'a VitParams<Vec<f32>>,
) -> Vec<(String, Vec<usize>, Cow<'a, [f32]>)> {
    let mut out = Vec::new();
    let mut pending_qkv: HashMap<(usize, bool), Vec<f32>> = HashMap::new();
    for (spec, t) in param_specs(cfg, ranks).iter().zip(params.tensors()) {
        let parts: Vec<&str> = spec.name.split('.').collect();
        let block = (parts[0] == "blocks").then(|| parts[1].parse::<usize>().expect("block index"));
        let fused = block.is_some_and(|i| qkv_fused(ranks, i))
            && parts.len() == 5
            && parts[2] == "attn"
            && ["q", "k", "v"].contains(&parts[3]);
        if !fused {
            out.push((spec.name.clone(), spec.shape.clone(), Cow::Borrowed(&t[..])));
            continue;
        }
        let i = block.expect("checked");
        let is_weight = parts[4] == "weight";
        let acc = pending_qkv.entry((i, is_weight)).or_default();
        acc.extend_from_slice(t);
        if parts[3] == "v" {
            let d = cfg.width;
            let (name, shape) = if is_weight {
                (format!("blocks.{i}.attn.qkv.weight"), vec![3 * d, d])
            } else {
                (format!("blocks.{i}.attn.qkv.bias"), vec![3 * d])
            };
            out.push((
                name,
                shape,
                Cow::Owned(pending_qkv.remove(&(i, is_weight)).expect("filled above")),
            ));
        }
    }
    out
}

/// Write a checkpoint atomically.
pub fn save_checkpoint(
    path: &Path,
    cfg: &VitConfig,
    ranks: &Ranks,
    params: &VitParams<Vec<f32>>,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let tensors = disk_tensors(cfg, ranks, params);
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("building {}: {e}", path.display()))?;
    let mut meta: HashMap<String, String> =
        extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("config".into(), serde_json::to_string(cfg)?);
    meta.insert("ranks".into(), serde_json::to_string(ranks)?);
    // Straight to the file, tensor by tensor: no second copy of the model.
    atomic_write_with(path, |tmp| {
        safetensors::serialize_to_file(views, &Some(meta), tmp)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))
    })
}

/// A tensor read from a file, converted to f32, with its shape.
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// What a safetensors parse error means, in words.
fn safetensors_problem(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("{len} bytes, shorter than the 8-byte header length (empty or truncated)"),
        E::HeaderTooLarge | E::InvalidHeaderLength => "its first 8 bytes do not give a header length that fits the file (not a safetensors file, or truncated)".into(),
        E::MetadataIncompleteBuffer => format!("its header lists more tensor bytes than the file's {len} (truncated?)"),
        E::InvalidOffset(name) => format!("tensor {name} lies outside the file's data (corrupt header)"),
        other => format!("{other} (truncated or corrupt?)"),
    }
}

/// Every tensor of a safetensors file as f32 (F32, F16 and BF16 accepted)
/// and its metadata. Errors name the file (and the tensor).
pub fn read_safetensors(
    path: &Path,
) -> Result<(BTreeMap<String, RawTensor>, BTreeMap<String, String>)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file: {}",
            path.display(),
            safetensors_problem(&e, bytes.len())
        )
    })?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(view.data()),
            Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(view.data())
                .into_iter()
                .map(f32::from)
                .collect(),
            Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(view.data())
                .into_iter()
                .map(f32::from)
                .collect(),
            other => bail!(
                "{}: tensor {name} has dtype {other:?}; only F32, F16 and BF16 are supported",
                path.display()
            ),
        };
        out.insert(
            name,
            RawTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok((out, meta))
}

/// The metadata of a safetensors file, reading only its header (cheap for
/// a large checkpoint).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("reading checkpoint {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| {
        format!(
            "{} is not a safetensors file (shorter than its 8-byte header length)",
            path.display()
        )
    })?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    if n > 100 << 20 || 8 + n > size {
        bail!(
            "{} is not a valid safetensors file: header of {n} bytes in a file of {size}",
            path.display()
        );
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("reading the header of {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| {
        anyhow!(
            "{}: the safetensors header is not JSON: {e}",
            path.display()
        )
    })?;
    let meta = json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(meta)
}

/// Take tensor `name` of shape `shape` out of `tensors`; a missing tensor, a
/// wrong shape (naming the key and both shapes) or a value that is NaN or
/// infinite is an error.
pub fn take(
    tensors: &mut BTreeMap<String, RawTensor>,
    path: &Path,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let t = tensors.remove(name).ok_or_else(|| {
        anyhow!(
            "{}: missing tensor {name} (expected shape {shape:?})",
            path.display()
        )
    })?;
    if t.shape != shape {
        bail!(
            "{}: tensor {name} has shape {:?}, expected {shape:?}",
            path.display(),
            t.shape
        );
    }
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        bail!(
            "{}: tensor {name} holds {} at index {i}",
            path.display(),
            t.data[i]
        );
    }
    Ok(t.data)
}

/// Error when tensors remain that the model does not use.
pub fn no_leftovers(tensors: &BTreeMap<String, RawTensor>, path: &Path) -> Result<()> {
    if let Some((name, t)) = tensors.iter().next() {
        bail!(
            "{}: unexpected tensor {name} of shape {:?} ({} unexpected in all)",
            path.display(),
            t.shape,
            tensors.len()
        );
    }
    Ok(())
}

/// Load one of the engine's own files (config and ranks from the metadata).
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let (mut tensors, metadata) = read_safetensors(path)?;
    if metadata.get("format").map(String::as_str) != Some(FORMAT) {
        bail!("{} is not an effrank-engine checkpoint (no format metadata); use model::import::load_any", path.display());
    }
    let cfg: VitConfig = serde_json::from_str(
        metadata
            .get("config")
            .ok_or_else(|| anyhow!("{}: metadata has no config", path.display()))?,
    )
    .with_context(|| format!("{}: metadata 'config'", path.display()))?;
    cfg.validate()
        .with_context(|| format!("{}: metadata 'config'", path.display()))?;
    let ranks: Ranks = serde_json::from_str(
        metadata
            .get("ranks")
            .ok_or_else(|| anyhow!("{}: metadata has no ranks", path.display()))?,
    )
    .with_context(|| format!("{}: metadata 'ranks'", path.display()))?;
    super::params::validate_ranks(&cfg, &ranks)
        .with_context(|| format!("{}: metadata 'ranks'", path.display()))?;
    let d = cfg.width;
    // Split fused qkv tensors back into q, k, v.
    for i in 0..cfg.depth {
        if !qkv_fused(&ranks, i) {
            continue;
        }
        let w = take(
            &mut tensors,
            path,
            &format!("blocks.{i}.attn.qkv.weight"),
            &[3 * d, d],
        )?;
        let b = cfg
            .family
            .qkv_bias
            .then(|| {
                take(
                    &mut tensors,
                    path,
                    &format!("blocks.{i}.attn.qkv.bias"),
                    &[3 * d],
                )
            })
            .transpose()?;
        for (j, name) in ["q", "k", "v"].iter().enumerate() {
            tensors.insert(
                format!("blocks.{i}.attn.{name}.weight"),
                RawTensor {
                    shape: vec![d, d],
                    data: w[j * d * d..(j + 1) * d * d].to_vec(),
                },
            );
            if let Some(b) = &b {
                tensors.insert(
                    format!("blocks.{i}.attn.{name}.bias"),
                    RawTensor {
                        shape: vec![d],
                        data: b[j * d..(j + 1) * d].to_vec(),
                    },
                );
            }
        }
    }
    let params = VitParams::build(&cfg, &ranks, |spec| {
        take(&mut tensors, path, &spec.name, &spec.shape)
    })?;
    no_leftovers(&tensors, path)?;
    Ok(Checkpoint {
        cfg,
        ranks,
        params,
        metadata,
        scheme: NamingScheme::Engine,
        import: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{dense_ranks, uniform_ranks};
    use crate::rng::Rng;

    fn random(cfg: &VitConfig, ranks: &Ranks) -> VitParams<Vec<f32>> {
        let mut rng = Rng::new(1);
        VitParams::build(cfg, ranks, |s| Ok::<_, ()>(rng.normal_vec(s.numel(), 1.0))).unwrap()
    }

    #[test]
    fn dense_and_lowrank_round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let mut mixed = uniform_ranks(&cfg, 4);
        mixed[1][crate::model::params::BlockLinear::K] = None;
        for ranks in [dense_ranks(&cfg), uniform_ranks(&cfg, 5), mixed] {
            let p = random(&cfg, &ranks);
            let path = dir.path().join("m.safetensors");
            let meta = BTreeMap::from([("normalize".to_string(), "half".to_string())]);
            save_checkpoint(&path, &cfg, &ranks, &p, &meta).unwrap();
            let ck = load_checkpoint(&path).unwrap();
            assert_eq!(ck.cfg, cfg);
            assert_eq!(ck.ranks, ranks);
            assert_eq!(ck.metadata["normalize"], "half");
            for (a, b) in ck.params.tensors().iter().zip(p.tensors()) {
                assert_eq!(*a, b);
            }
        }
    }

    #[test]
    fn dense_files_store_fused_qkv_like_timm() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let ranks = dense_ranks(&cfg);
        let p = random(&cfg, &ranks);
        let path = dir.path().join("t.safetensors");
        save_checkpoint(&path, &cfg, &ranks, &p, &BTreeMap::new()).unwrap();
        let (tensors, _) = read_safetensors(&path).unwrap();
        let qkv = &tensors["blocks.0.attn.qkv.weight"];
        assert_eq!(qkv.shape, vec![192, 64]);
        let Linear::Dense { weight: k, .. } = &p.blocks[0].k else {
            panic!()
        };
        assert_eq!(&qkv.data[64 * 64..2 * 64 * 64], k.as_slice());
        assert!(!tensors.contains_key("blocks.0.attn.q.weight"));
    }

    use crate::model::params::Linear;
}
