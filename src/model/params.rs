//! The ViT's parameter tensors as a plain struct (llm.c style), generic over
//! what holds each tensor: device buffers for weights, gradients and AdamW
//! moments, host `Vec<f32>` for checkpoints, shapes for documentation.
//!
//! Tensor names are timm's, with q, k and v as separate layers and a
//! documented extension for low-rank layers:
//!
//! | name | shape |
//! |---|---|
//! | `patch_embed.proj.weight` | `[width, channels, patch, patch]` |
//! | `patch_embed.proj.bias` (unless `!patch_bias`) | `[width]` |
//! | `cls_token` (with `class_token`) | `[1, 1, width]` |
//! | `dist_token` (with `dist_token`) | `[1, 1, width]` |
//! | `reg_token` (with `registers`) | `[1, registers, width]` |
//! | `pos_embed` | `[1, pos_rows, width]` (every token, or the patches) |
//! | `norm_pre.weight`, `.bias` (with `norm_pre`) | `[width]` |
//! | `blocks.N.norm1.weight`, `.bias` | `[width]` |
//! | `blocks.N.attn.{q,k,v,proj}.weight` (dense) | `[width, width]` |
//! | `blocks.N.attn.{q,k,v,proj}.U`, `.V` (low-rank) | `[width, r]`, `[r, width]` |
//! | `blocks.N.attn.{q,k,v,proj}.bias` (q, k, v: unless `!qkv_bias`) | `[width]` |
//! | `blocks.N.ls1.gamma` (with `layer_scale`) | `[width]` |
//! | `blocks.N.norm2.weight`, `.bias` | `[width]` |
//! | `blocks.N.mlp.fc1.weight` or `.U`/`.V`, `.bias` | `[mlp, width]`, `[mlp]` |
//! | `blocks.N.mlp.fc2.weight` or `.U`/`.V`, `.bias` | `[width, mlp]`, `[width]` |
//! | `blocks.N.ls2.gamma` (with `layer_scale`) | `[width]` |
//! | `norm.weight`, `.bias` (`fc_norm.*` for average pooling) | `[width]` |
//! | `head.weight`, `head.bias` | `[classes, head_inputs]`, `[classes]` |
//! | `head_dist.weight`, `.bias` (distilled pooling) | `[classes, width]`, `[classes]` |
//!
//! The optional tensors follow the config's `family` (`model::family`).
//! A dense checkpoint on disk stores q, k, v fused as timm's
//! `blocks.N.attn.qkv.weight` (see `model::checkpoint`).

use super::config::VitConfig;
use super::family::Pool;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The six factorizable linear layers of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockLinear {
    Q,
    K,
    V,
    /// The attention output projection.
    Proj,
    Fc1,
    Fc2,
}

impl BlockLinear {
    /// Every layer, in the block's order.
    pub const ALL: [BlockLinear; 6] = [
        BlockLinear::Q,
        BlockLinear::K,
        BlockLinear::V,
        BlockLinear::Proj,
        BlockLinear::Fc1,
        BlockLinear::Fc2,
    ];

    /// Tensor-name stem inside a block: `attn.q` ... `mlp.fc2` (timm's names).
    pub fn name(self) -> &'static str {
        match self {
            BlockLinear::Q => "attn.q",
            BlockLinear::K => "attn.k",
            BlockLinear::V => "attn.v",
            BlockLinear::Proj => "attn.proj",
            BlockLinear::Fc1 => "mlp.fc1",
            BlockLinear::Fc2 => "mlp.fc2",
        }
    }

    /// Short name, as flags and tables write it: q, k, v, proj, fc1, fc2.
    pub fn short(self) -> &'static str {
        match self {
            BlockLinear::Q => "q",
            BlockLinear::K => "k",
            BlockLinear::V => "v",
            BlockLinear::Proj => "proj",
            BlockLinear::Fc1 => "fc1",
            BlockLinear::Fc2 => "fc2",
        }
    }

    /// (out, in) of this layer in a model of shape `cfg`.
    pub fn shape(self, cfg: &VitConfig) -> (usize, usize) {
        match self {
            BlockLinear::Q | BlockLinear::K | BlockLinear::V | BlockLinear::Proj => {
                (cfg.width, cfg.width)
            }
            BlockLinear::Fc1 => (cfg.mlp, cfg.width),
            BlockLinear::Fc2 => (cfg.width, cfg.mlp),
        }
    }

    /// Position in `ALL` (and in the on-disk rank arrays).
    fn index(self) -> usize {
        self as usize
    }
}

/// One value per factorizable layer of a block, indexed by `BlockLinear`
/// (stored, and serialized, in `BlockLinear::ALL` order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerLinear<T>([T; 6]);

impl<T> PerLinear<T> {
    /// The value of every layer from `f`.
    pub fn from_fn(mut f: impl FnMut(BlockLinear) -> T) -> Self {
        PerLinear(BlockLinear::ALL.map(&mut f))
    }
    /// (layer, value) in block order.
    pub fn iter(&self) -> impl Iterator<Item = (BlockLinear, &T)> {
        BlockLinear::ALL.into_iter().zip(self.0.iter())
    }
    /// The values in block order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

impl<T> std::ops::Index<BlockLinear> for PerLinear<T> {
    type Output = T;
    fn index(&self, l: BlockLinear) -> &T {
        &self.0[l.index()]
    }
}

impl<T> std::ops::IndexMut<BlockLinear> for PerLinear<T> {
    fn index_mut(&mut self, l: BlockLinear) -> &mut T {
        &mut self.0[l.index()]
    }
}

/// Rank of each factorizable layer of one block; `None` keeps it dense.
pub type BlockRanks = PerLinear<Option<usize>>;

/// Ranks of every block: the model is a teacher when all are `None`.
pub type Ranks = Vec<BlockRanks>;

/// All-dense ranks for `cfg`.
pub fn dense_ranks(cfg: &VitConfig) -> Ranks {
    vec![BlockRanks::default(); cfg.depth]
}

/// One rank `r` for every factorizable layer.
pub fn uniform_ranks(cfg: &VitConfig, r: usize) -> Ranks {
    vec![BlockRanks::from_fn(|_| Some(r)); cfg.depth]
}

/// True when any layer is low-rank.
pub fn is_lowrank(ranks: &Ranks) -> bool {
    ranks.iter().any(|b| b.values().any(|r| r.is_some()))
}

/// The largest rank any layer of `cfg` can take: the smallest min(out, in).
pub fn max_rank(cfg: &VitConfig) -> usize {
    BlockLinear::ALL
        .iter()
        .map(|l| l.shape(cfg))
        .map(|(o, i)| o.min(i))
        .min()
        .unwrap_or(1)
}

/// Check every rank against its layer: 1 <= r <= min(out, in).
pub fn validate_ranks(cfg: &VitConfig, ranks: &Ranks) -> Result<()> {
    if ranks.len() != cfg.depth {
        bail!(
            "ranks given for {} blocks, the model has {}",
            ranks.len(),
            cfg.depth
        );
    }
    for (i, b) in ranks.iter().enumerate() {
        for (layer, r) in b.iter() {
            if let Some(r) = *r {
                let (out, inp) = layer.shape(cfg);
                if r == 0 || r > out.min(inp) {
                    bail!("rank {r} out of range for layer blocks.{i}.{} of shape [{out}, {inp}] (out x in): must be 1..={}", layer.name(), out.min(inp));
                }
            }
        }
    }
    Ok(())
}

/// A linear layer `y = W x + b`, dense or factorized as `W = U V`; `b`
/// is absent where the family has none (q, k and v with `!qkv_bias`).
#[derive(Clone, Debug)]
pub enum Linear<T> {
    Dense { weight: T, bias: Option<T> },
    LowRank { u: T, v: T, bias: Option<T> },
}

impl<T> Linear<T> {
    pub fn bias(&self) -> Option<&T> {
        match self {
            Linear::Dense { bias, .. } | Linear::LowRank { bias, .. } => bias.as_ref(),
        }
    }
    pub fn bias_mut(&mut self) -> Option<&mut T> {
        match self {
            Linear::Dense { bias, .. } | Linear::LowRank { bias, .. } => bias.as_mut(),
        }
    }
}

impl BlockLinear {
    /// Whether this layer has a bias in a model of family `cfg.family`.
    pub fn has_bias(self, cfg: &VitConfig) -> bool {
        match self {
            BlockLinear::Q | BlockLinear::K | BlockLinear::V => cfg.family.qkv_bias,
            _ => true,
        }
    }
}

/// One pre-norm transformer block.
#[derive(Clone, Debug)]
pub struct Block<T> {
    pub norm1_w: T,
    pub norm1_b: T,
    pub q: Linear<T>,
    pub k: Linear<T>,
    pub v: Linear<T>,
    pub proj: Linear<T>,
    /// LayerScale of the attention sub-layer (`layer_scale`).
    pub ls1: Option<T>,
    pub norm2_w: T,
    pub norm2_b: T,
    pub fc1: Linear<T>,
    pub fc2: Linear<T>,
    /// LayerScale of the MLP sub-layer (`layer_scale`).
    pub ls2: Option<T>,
}

impl<T> Block<T> {
    /// The factorizable layer `l`.
    pub fn linear(&self, l: BlockLinear) -> &Linear<T> {
        match l {
            BlockLinear::Q => &self.q,
            BlockLinear::K => &self.k,
            BlockLinear::V => &self.v,
            BlockLinear::Proj => &self.proj,
            BlockLinear::Fc1 => &self.fc1,
            BlockLinear::Fc2 => &self.fc2,
        }
    }
    pub fn linear_mut(&mut self, l: BlockLinear) -> &mut Linear<T> {
        match l {
            BlockLinear::Q => &mut self.q,
            BlockLinear::K => &mut self.k,
            BlockLinear::V => &mut self.v,
            BlockLinear::Proj => &mut self.proj,
            BlockLinear::Fc1 => &mut self.fc1,
            BlockLinear::Fc2 => &mut self.fc2,
        }
    }
}

/// All parameters of a ViT.
#[derive(Clone, Debug)]
pub struct VitParams<T> {
    pub patch_w: T,
    pub patch_b: Option<T>,
    pub cls: Option<T>,
    pub dist: Option<T>,
    /// The register tokens, `[registers, width]`.
    pub reg: Option<T>,
    pub pos: T,
    /// CLIP's LayerNorm before the blocks (`norm_pre`).
    pub norm_pre: Option<(T, T)>,
    pub blocks: Vec<Block<T>>,
    /// The final LayerNorm (`norm`, or `fc_norm` for average pooling).
    pub norm_w: T,
    pub norm_b: T,
    pub head: Linear<T>,
    /// DeiT's distillation head (`Pool::Distilled`).
    pub head_dist: Option<Linear<T>>,
}

/// Name, shape and optimizer treatment of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies to weight matrices only (as timm's optimizer
    /// factory does): not to biases, norms, class token or positions.
    pub decay: bool,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn spec(name: String, shape: Vec<usize>, decay: bool) -> TensorSpec {
    TensorSpec { name, shape, decay }
}

/// The shape of one linear layer's tensors: `o` outputs, `i` inputs,
/// dense or of rank `r`, with or without a bias.
struct LinearSpec {
    o: usize,
    i: usize,
    rank: Option<usize>,
    bias: bool,
}

fn linear_specs(out: &mut Vec<TensorSpec>, prefix: &str, l: LinearSpec) {
    let LinearSpec { o, i, rank, bias } = l;
    match rank {
        None => out.push(spec(format!("{prefix}.weight"), vec![o, i], true)),
        Some(r) => {
            out.push(spec(format!("{prefix}.U"), vec![o, r], true));
            out.push(spec(format!("{prefix}.V"), vec![r, i], true));
        }
    }
    if bias {
        out.push(spec(format!("{prefix}.bias"), vec![o], false));
    }
}

/// Every parameter tensor of the model, in the order `VitParams::tensors`
/// lists them. Ranks must be valid (`validate_ranks`).
pub fn param_specs(cfg: &VitConfig, ranks: &Ranks) -> Vec<TensorSpec> {
    let (d, f) = (cfg.width, &cfg.family);
    let mut s = vec![spec(
        "patch_embed.proj.weight".into(),
        vec![d, cfg.channels, cfg.patch, cfg.patch],
        true,
    )];
    let optional = |s: &mut Vec<TensorSpec>, present: bool, name: &str, shape: Vec<usize>| {
        if present {
            s.push(spec(name.into(), shape, false));
        }
    };
    optional(&mut s, f.patch_bias, "patch_embed.proj.bias", vec![d]);
    optional(&mut s, f.class_token, "cls_token", vec![1, 1, d]);
    optional(&mut s, f.dist_token, "dist_token", vec![1, 1, d]);
    optional(
        &mut s,
        f.registers > 0,
        "reg_token",
        vec![1, f.registers, d],
    );
    s.push(spec("pos_embed".into(), vec![1, cfg.pos_rows(), d], false));
    optional(&mut s, f.norm_pre, "norm_pre.weight", vec![d]);
    optional(&mut s, f.norm_pre, "norm_pre.bias", vec![d]);
    for (i, br) in ranks.iter().enumerate() {
        s.push(spec(format!("blocks.{i}.norm1.weight"), vec![d], false));
        s.push(spec(format!("blocks.{i}.norm1.bias"), vec![d], false));
        let linear = |s: &mut Vec<TensorSpec>, l: BlockLinear| {
            let (o, inp) = l.shape(cfg);
            let shape = LinearSpec {
                o,
                i: inp,
                rank: br[l],
                bias: l.has_bias(cfg),
            };
            linear_specs(s, &format!("blocks.{i}.{}", l.name()), shape);
        };
        for l in [
            BlockLinear::Q,
            BlockLinear::K,
            BlockLinear::V,
            BlockLinear::Proj,
        ] {
            linear(&mut s, l);
        }
        optional(
            &mut s,
            f.layer_scale,
            &format!("blocks.{i}.ls1.gamma"),
            vec![d],
        );
        s.push(spec(format!("blocks.{i}.norm2.weight"), vec![d], false));
        s.push(spec(format!("blocks.{i}.norm2.bias"), vec![d], false));
        for l in [BlockLinear::Fc1, BlockLinear::Fc2] {
            linear(&mut s, l);
        }
        optional(
            &mut s,
            f.layer_scale,
            &format!("blocks.{i}.ls2.gamma"),
            vec![d],
        );
    }
    let norm = f.pool.norm_name();
    s.push(spec(format!("{norm}.weight"), vec![d], false));
    s.push(spec(format!("{norm}.bias"), vec![d], false));
    let head = |inputs| LinearSpec {
        o: cfg.classes,
        i: inputs,
        rank: None,
        bias: true,
    };
    linear_specs(&mut s, "head", head(f.pool.head_inputs(d)));
    if f.pool == Pool::Distilled {
        linear_specs(&mut s, "head_dist", head(d));
    }
    s
}

/// Total number of parameters.
pub fn param_count(cfg: &VitConfig, ranks: &Ranks) -> usize {
    param_specs(cfg, ranks).iter().map(|t| t.numel()).sum()
}

fn linear_push<'a, T>(out: &mut Vec<&'a T>, l: &'a Linear<T>) {
    match l {
        Linear::Dense { weight, bias } => out.extend(std::iter::once(weight).chain(bias)),
        Linear::LowRank { u, v, bias } => out.extend([u, v].into_iter().chain(bias)),
    }
}

fn linear_push_mut<'a, T>(out: &mut Vec<&'a mut T>, l: &'a mut Linear<T>) {
    match l {
        Linear::Dense { weight, bias } => out.extend(std::iter::once(weight).chain(bias)),
        Linear::LowRank { u, v, bias } => out.extend([u, v].into_iter().chain(bias)),
    }
}

fn linear_take<T>(it: &mut impl Iterator<Item = T>, rank: Option<usize>, bias: bool) -> Linear<T> {
    let mut next = || {
        it.next()
            .expect("param_specs and VitParams::from_tensors agree")
    };
    match rank {
        None => {
            let weight = next();
            Linear::Dense {
                weight,
                bias: bias.then(next),
            }
        }
        Some(_) => {
            let (u, v) = (next(), next());
            Linear::LowRank {
                u,
                v,
                bias: bias.then(next),
            }
        }
    }
}

impl<T> VitParams<T> {
    /// Build from tensors given in `param_specs` order.
    pub fn from_tensors(cfg: &VitConfig, ranks: &Ranks, tensors: Vec<T>) -> Self {
        assert_eq!(
            tensors.len(),
            param_specs(cfg, ranks).len(),
            "one tensor per spec"
        );
        let f = &cfg.family;
        let mut it = tensors.into_iter();
        let next = |it: &mut std::vec::IntoIter<T>| it.next().expect("counted above");
        let maybe = |it: &mut std::vec::IntoIter<T>, present: bool| present.then(|| next(it));
        let patch_w = next(&mut it);
        let patch_b = maybe(&mut it, f.patch_bias);
        let cls = maybe(&mut it, f.class_token);
        let dist = maybe(&mut it, f.dist_token);
        let reg = maybe(&mut it, f.registers > 0);
        let pos = next(&mut it);
        let norm_pre = f.norm_pre.then(|| (next(&mut it), next(&mut it)));
        let mut blocks = Vec::with_capacity(cfg.depth);
        for br in ranks {
            let norm1_w = next(&mut it);
            let norm1_b = next(&mut it);
            let layer = |it: &mut std::vec::IntoIter<T>, l: BlockLinear| {
                linear_take(it, br[l], l.has_bias(cfg))
            };
            let q = layer(&mut it, BlockLinear::Q);
            let k = layer(&mut it, BlockLinear::K);
            let v = layer(&mut it, BlockLinear::V);
            let proj = layer(&mut it, BlockLinear::Proj);
            let ls1 = maybe(&mut it, f.layer_scale);
            let norm2_w = next(&mut it);
            let norm2_b = next(&mut it);
            let fc1 = layer(&mut it, BlockLinear::Fc1);
            let fc2 = layer(&mut it, BlockLinear::Fc2);
            let ls2 = maybe(&mut it, f.layer_scale);
            blocks.push(Block {
                norm1_w,
                norm1_b,
                q,
                k,
                v,
                proj,
                ls1,
                norm2_w,
                norm2_b,
                fc1,
                fc2,
                ls2,
            });
        }
        let norm_w = next(&mut it);
        let norm_b = next(&mut it);
        let head = linear_take(&mut it, None, true);
        let head_dist = (f.pool == Pool::Distilled).then(|| linear_take(&mut it, None, true));
        VitParams {
            patch_w,
            patch_b,
            cls,
            dist,
            reg,
            pos,
            norm_pre,
            blocks,
            norm_w,
            norm_b,
            head,
            head_dist,
        }
    }

    /// Build by calling `make` on each spec, in order.
    pub fn build<E>(
        cfg: &VitConfig,
        ranks: &Ranks,
        mut make: impl FnMut(&TensorSpec) -> Result<T, E>,
    ) -> Result<Self, E> {
        let tensors = param_specs(cfg, ranks)
            .iter()
            .map(&mut make)
            .collect::<Result<Vec<T>, E>>()?;
        Ok(Self::from_tensors(cfg, ranks, tensors))
    }

    /// Every tensor, in `param_specs` order.
    pub fn tensors(&self) -> Vec<&T> {
        let mut out = vec![&self.patch_w];
        out.extend(
            self.patch_b
                .iter()
                .chain(&self.cls)
                .chain(&self.dist)
                .chain(&self.reg),
        );
        out.push(&self.pos);
        if let Some((w, b)) = &self.norm_pre {
            out.extend([w, b]);
        }
        for b in &self.blocks {
            out.extend([&b.norm1_w, &b.norm1_b]);
            for l in [&b.q, &b.k, &b.v, &b.proj] {
                linear_push(&mut out, l);
            }
            out.extend(&b.ls1);
            out.extend([&b.norm2_w, &b.norm2_b]);
            for l in [&b.fc1, &b.fc2] {
                linear_push(&mut out, l);
            }
            out.extend(&b.ls2);
        }
        out.extend([&self.norm_w, &self.norm_b]);
        linear_push(&mut out, &self.head);
        if let Some(h) = &self.head_dist {
            linear_push(&mut out, h);
        }
        out
    }

    /// Every tensor, mutably, in `param_specs` order.
    pub fn tensors_mut(&mut self) -> Vec<&mut T> {
        let mut out = vec![&mut self.patch_w];
        out.extend(
            self.patch_b
                .iter_mut()
                .chain(&mut self.cls)
                .chain(&mut self.dist)
                .chain(&mut self.reg),
        );
        out.push(&mut self.pos);
        if let Some((w, b)) = &mut self.norm_pre {
            out.extend([w, b]);
        }
        for b in &mut self.blocks {
            out.push(&mut b.norm1_w);
            out.push(&mut b.norm1_b);
            linear_push_mut(&mut out, &mut b.q);
            linear_push_mut(&mut out, &mut b.k);
            linear_push_mut(&mut out, &mut b.v);
            linear_push_mut(&mut out, &mut b.proj);
            out.extend(&mut b.ls1);
            out.push(&mut b.norm2_w);
            out.push(&mut b.norm2_b);
            linear_push_mut(&mut out, &mut b.fc1);
            linear_push_mut(&mut out, &mut b.fc2);
            out.extend(&mut b.ls2);
        }
        out.push(&mut self.norm_w);
        out.push(&mut self.norm_b);
        linear_push_mut(&mut out, &mut self.head);
        if let Some(h) = &mut self.head_dist {
            linear_push_mut(&mut out, h);
        }
        out
    }

    /// The same structure with every tensor mapped through `f` (with its spec).
    pub fn map<U, E>(
        &self,
        cfg: &VitConfig,
        ranks: &Ranks,
        mut f: impl FnMut(&TensorSpec, &T) -> Result<U, E>,
    ) -> Result<VitParams<U>, E> {
        let specs = param_specs(cfg, ranks);
        let mapped = specs
            .iter()
            .zip(self.tensors())
            .map(|(s, t)| f(s, t))
            .collect::<Result<Vec<U>, E>>()?;
        Ok(VitParams::from_tensors(cfg, ranks, mapped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(out: usize, inp: usize, r: Option<usize>) -> usize {
        match r {
            None => out * inp + out,
            Some(r) => r * (out + inp) + out,
        }
    }

    #[test]
    fn vit_b32_teacher_has_the_method_md_count() {
        let cfg = VitConfig::preset("vit-b32", 100).unwrap();
        assert_eq!(param_count(&cfg, &dense_ranks(&cfg)), 87_532_132);
    }

    #[test]
    fn lowrank_count_is_r_times_in_plus_out_plus_bias_per_layer() {
        let cfg = VitConfig::preset("vit-b32", 100).unwrap();
        let r = 32;
        let dense = param_count(&cfg, &dense_ranks(&cfg));
        let d = cfg.width;
        let per_block_dense = 4 * lin(d, d, None) + lin(cfg.mlp, d, None) + lin(d, cfg.mlp, None);
        let per_block_lr =
            4 * lin(d, d, Some(r)) + lin(cfg.mlp, d, Some(r)) + lin(d, cfg.mlp, Some(r));
        let expect = dense - cfg.depth * (per_block_dense - per_block_lr);
        assert_eq!(param_count(&cfg, &uniform_ranks(&cfg, r)), expect);
    }

    #[test]
    fn specs_and_tensors_agree_in_order() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let mut ranks = dense_ranks(&cfg);
        ranks[1][BlockLinear::Fc1] = Some(3);
        let specs = param_specs(&cfg, &ranks);
        let p: VitParams<String> =
            VitParams::build(&cfg, &ranks, |s| Ok::<_, ()>(s.name.clone())).unwrap();
        let names: Vec<&String> = p.tensors();
        assert_eq!(names.len(), specs.len());
        for (n, s) in names.iter().zip(&specs) {
            assert_eq!(**n, s.name);
        }
        assert!(matches!(p.blocks[1].fc1, Linear::LowRank { .. }));
        let mut p2 = p.clone();
        assert_eq!(p2.tensors_mut().len(), specs.len());
    }

    #[test]
    fn ranks_serialize_as_arrays_in_block_order() {
        let mut r = BlockRanks::default();
        r[BlockLinear::Proj] = Some(7);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "[null,null,null,7,null,null]"
        );
        assert_eq!(
            serde_json::from_str::<BlockRanks>("[null,null,null,7,null,null]").unwrap(),
            r
        );
        assert_eq!(
            BlockLinear::ALL.map(|l| l.short()).join(","),
            "q,k,v,proj,fc1,fc2"
        );
    }

    #[test]
    fn ranks_out_of_range_name_the_layer_and_shape() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let e = validate_ranks(&cfg, &uniform_ranks(&cfg, 65))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks.0.attn.q") && e.contains("[64, 64]"),
            "{e}"
        );
        let e = validate_ranks(&cfg, &uniform_ranks(&cfg, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 0"), "{e}");
    }
}
