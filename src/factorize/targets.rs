//! Which projections of which blocks a student factorizes (`--layers`,
//! `--blocks`); every other layer stays dense.
//!
//! A layer set is written as names separated by `,` (or `+`, the form
//! `sweep --groups` uses inside one group, since commas separate groups):
//! any of q, k, v, proj, fc1, fc2, and the groups attn (q, k, v, proj),
//! mlp (fc1, fc2) and all. A block range is `A-B` (inclusive, 0-based) or a
//! single index `A`. Both are written back in the same form, which is how
//! provenance and results records store them.

use crate::model::params::{BlockLinear, BlockRanks, PerLinear, Ranks};
use crate::model::VitConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// The named groups of layers, with what they hold, in the order names are
/// written back (the first whose layers a set equals names it).
const GROUPS: [(&str, &[BlockLinear]); 3] = [
    ("all", &BlockLinear::ALL),
    (
        "attn",
        &[
            BlockLinear::Q,
            BlockLinear::K,
            BlockLinear::V,
            BlockLinear::Proj,
        ],
    ),
    ("mlp", &[BlockLinear::Fc1, BlockLinear::Fc2]),
];

/// A non-empty set of the six projections of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSet(PerLinear<bool>);

impl LayerSet {
    /// All six projections (the default).
    pub fn all() -> Self {
        LayerSet(PerLinear::from_fn(|_| true))
    }

    pub fn contains(&self, l: BlockLinear) -> bool {
        self.0[l]
    }

    /// The layers of the set, in block order.
    pub fn layers(&self) -> impl Iterator<Item = BlockLinear> + '_ {
        self.0.iter().filter(|(_, &on)| on).map(|(l, _)| l)
    }

    fn of(layers: &[BlockLinear]) -> Self {
        LayerSet(PerLinear::from_fn(|l| layers.contains(&l)))
    }
}

impl FromStr for LayerSet {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        let mut set = PerLinear::<bool>::default();
        for name in text
            .split([',', '+'])
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            let layers: Vec<BlockLinear> = match GROUPS.iter().find(|g| g.0 == name) {
                Some(g) => g.1.to_vec(),
                None => BlockLinear::ALL
                    .into_iter()
                    .filter(|l| l.short() == name)
                    .collect(),
            };
            if layers.is_empty() {
                bail!("unknown layer '{name}': use q, k, v, proj, fc1, fc2, or the groups attn (q,k,v,proj), mlp (fc1,fc2), all");
            }
            for l in layers {
                set[l] = true;
            }
        }
        if !set.values().any(|&on| on) {
            bail!("no layers in '{text}': name at least one of q, k, v, proj, fc1, fc2, attn, mlp, all");
        }
        Ok(LayerSet(set))
    }
}

impl fmt::Display for LayerSet {
    /// A group's name when the set is one, else the layers joined by `+`
    /// (a form that is also a valid folder name and `--groups` entry).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(g) = GROUPS.iter().find(|g| LayerSet::of(g.1) == *self) {
            return f.write_str(g.0);
        }
        let names: Vec<&str> = self.layers().map(|l| l.short()).collect();
        f.write_str(&names.join("+"))
    }
}

/// An inclusive range of blocks, 0-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub first: usize,
    pub last: usize,
}

impl FromStr for BlockRange {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        let index = |t: &str| {
            t.trim().parse::<usize>().with_context(|| {
                format!(
                    "block '{}' in '{text}' is not a non-negative integer (give A-B or A, 0-based)",
                    t.trim()
                )
            })
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (index(a)?, index(b)?),
            None => (index(text)?, index(text)?),
        };
        if first > last {
            bail!("block range {text} runs backwards: the first block {first} is after the last {last}");
        }
        Ok(BlockRange { first, last })
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Serialize through `Display` and read back through `FromStr`.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(LayerSet);
serde_as_text!(BlockRange);

/// The layers a student factorizes: `layers` in the blocks of `blocks`
/// (every block when None).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub layers: LayerSet,
    pub blocks: Option<BlockRange>,
}

impl Default for Targets {
    fn default() -> Self {
        Targets {
            layers: LayerSet::all(),
            blocks: None,
        }
    }
}

impl Targets {
    /// Rank `r` on every target layer of a model of shape `cfg`, the rest
    /// dense; an error when the block range does not fit the model.
    pub fn ranks(&self, cfg: &VitConfig, r: usize) -> Result<Ranks> {
        let (first, last) = self.block_bounds(cfg)?;
        Ok((0..cfg.depth)
            .map(|b| {
                if (first..=last).contains(&b) {
                    BlockRanks::from_fn(|l| self.layers.contains(l).then_some(r))
                } else {
                    BlockRanks::default()
                }
            })
            .collect())
    }

    fn block_bounds(&self, cfg: &VitConfig) -> Result<(usize, usize)> {
        match self.blocks {
            None => Ok((0, cfg.depth - 1)),
            Some(b) if b.last < cfg.depth => Ok((b.first, b.last)),
            Some(b) => bail!(
                "--blocks {b}: the model has {} blocks (0-{})",
                cfg.depth,
                cfg.depth - 1
            ),
        }
    }
}

impl fmt::Display for Targets {
    /// "attn", "mlp in blocks 0-5": how reports name a student's targets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.blocks {
            None => write!(f, "{}", self.layers),
            Some(b) => write!(f, "{} in blocks {b}", self.layers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{dense_ranks, param_count, uniform_ranks};

    #[test]
    fn layer_names_and_groups_parse_and_print_back() {
        assert_eq!(
            "attn".parse::<LayerSet>().unwrap(),
            "q,k,v,proj".parse().unwrap()
        );
        assert_eq!(
            "mlp".parse::<LayerSet>().unwrap(),
            "fc2,fc1".parse().unwrap()
        );
        assert_eq!("all".parse::<LayerSet>().unwrap(), LayerSet::all());
        assert_eq!("attn,mlp".parse::<LayerSet>().unwrap(), LayerSet::all());
        let qk: LayerSet = "q+k".parse().unwrap();
        assert_eq!(
            qk.layers().collect::<Vec<_>>(),
            vec![BlockLinear::Q, BlockLinear::K]
        );
        for (text, shown) in [
            ("k,q", "q+k"),
            ("fc1,fc2", "mlp"),
            ("q,k,v,proj,fc1,fc2", "all"),
            ("proj", "proj"),
            ("attn,fc2", "q+k+v+proj+fc2"),
        ] {
            assert_eq!(text.parse::<LayerSet>().unwrap().to_string(), shown);
            assert_eq!(shown.parse::<LayerSet>().unwrap(), text.parse().unwrap());
        }
    }

    #[test]
    fn bad_layer_sets_and_block_ranges_are_errors_that_say_why() {
        let e = "q,qkv".parse::<LayerSet>().unwrap_err().to_string();
        assert!(
            e.contains("unknown layer 'qkv'") && e.contains("attn"),
            "{e}"
        );
        assert!(""
            .parse::<LayerSet>()
            .unwrap_err()
            .to_string()
            .contains("no layers"));
        assert!(" , "
            .parse::<LayerSet>()
            .unwrap_err()
            .to_string()
            .contains("no layers"));
        assert_eq!(
            "3-5".parse::<BlockRange>().unwrap(),
            BlockRange { first: 3, last: 5 }
        );
        assert_eq!(
            "4".parse::<BlockRange>().unwrap(),
            BlockRange { first: 4, last: 4 }
        );
        assert!("5-3"
            .parse::<BlockRange>()
            .unwrap_err()
            .to_string()
            .contains("backwards"));
        assert!("a-3"
            .parse::<BlockRange>()
            .unwrap_err()
            .to_string()
            .contains("block 'a'"));
        assert!("-1".parse::<BlockRange>().is_err());
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let t = Targets {
            layers: LayerSet::all(),
            blocks: Some("1-2".parse().unwrap()),
        };
        let e = t.ranks(&cfg, 4).unwrap_err().to_string();
        assert_eq!(e, "--blocks 1-2: the model has 2 blocks (0-1)");
    }

    #[test]
    fn targets_serialize_as_the_flags_write_them() {
        let t = Targets {
            layers: "attn".parse().unwrap(),
            blocks: Some("0-5".parse().unwrap()),
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"layers":"attn","blocks":"0-5"}"#);
        assert_eq!(serde_json::from_str::<Targets>(&json).unwrap(), t);
        assert_eq!(t.to_string(), "attn in blocks 0-5");
        assert_eq!(
            serde_json::to_string(&Targets::default()).unwrap(),
            r#"{"layers":"all","blocks":null}"#
        );
        assert!(serde_json::from_str::<Targets>(r#"{"layers":"qq","blocks":null}"#).is_err());
    }

    #[test]
    fn default_targets_are_uniform_ranks() {
        let cfg = VitConfig::preset("vit-b32", 100).unwrap();
        assert_eq!(
            Targets::default().ranks(&cfg, 16).unwrap(),
            uniform_ranks(&cfg, 16)
        );
    }

    /// vit-demo: width 64, MLP 128, 2 blocks, 10 classes. Counted by hand:
    /// patch embedding 64·48 + 64, class token 64, positions 17·64; per
    /// block two LayerNorms (4·64), q, k, v, proj (4 · (64·64 + 64)), fc1
    /// (128·64 + 128), fc2 (64·128 + 64); final LayerNorm 2·64; head
    /// 10·64 + 10.
    #[test]
    fn parameter_counts_match_a_hand_count() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let embed = 64 * 48 + 64 + 64 + 17 * 64;
        let block = 4 * 64 + 4 * (64 * 64 + 64) + (128 * 64 + 128) + (64 * 128 + 64);
        let tail = 2 * 64 + 10 * 64 + 10;
        let dense = embed + 2 * block + tail;
        assert_eq!(dense, 72_010);
        assert_eq!(param_count(&cfg, &dense_ranks(&cfg)), dense);
        let r = 4;
        // attn in block 1 only: q, k, v, proj each 64·64 → 4·(64 + 64).
        let attn_b1 = Targets {
            layers: "attn".parse().unwrap(),
            blocks: Some("1".parse().unwrap()),
        };
        assert_eq!(
            param_count(&cfg, &attn_b1.ranks(&cfg, r).unwrap()),
            dense - 4 * (64 * 64 - r * (64 + 64))
        );
        // mlp in both blocks: fc1 128·64 and fc2 64·128 → r·(128 + 64) each.
        let mlp = Targets {
            layers: "mlp".parse().unwrap(),
            blocks: None,
        };
        assert_eq!(
            param_count(&cfg, &mlp.ranks(&cfg, r).unwrap()),
            dense - 2 * 2 * (128 * 64 - r * (128 + 64))
        );
        // q and fc2 in blocks 0-1, written as a range.
        let mixed = Targets {
            layers: "q,fc2".parse().unwrap(),
            blocks: Some("0-1".parse().unwrap()),
        };
        let per_block = (64 * 64 - r * 128) + (64 * 128 - r * 192);
        assert_eq!(
            param_count(&cfg, &mixed.ranks(&cfg, r).unwrap()),
            dense - 2 * per_block
        );
        let ranks = mixed.ranks(&cfg, r).unwrap();
        assert_eq!(ranks[0][BlockLinear::Q], Some(4));
        assert_eq!(ranks[0][BlockLinear::K], None);
    }
}
