//! How the engine computes: every choice of code path that can move a
//! result's bits, in one typed value.
//!
//! `ComputeOptions` holds the choices as the user gave them (`auto` leaves
//! each to the device's default). The command line parses them once
//! (`src/cli/common.rs`, `ComputeFlags`): a flag wins; else its documented
//! environment variable, read by one rule (`switch_from_env`); else `auto`.
//! `ComputeOptions::resolve` turns them, for one device, into
//! `ComputePaths`: plain booleans that the model (`Vit::paths`) and the
//! CPU's kernels (`ops::configure_cpu`) follow. `ComputeRecord` is what
//! a run writes into every checkpoint's metadata and hashes into the
//! teacher-logit cache key: the engine version and commit, the device, the
//! precision, the options given and the paths taken.
//!
//! The flags, their defaults and their variables: README, "Compute
//! options" (and `--help`).

pub use crate::device::DeviceKind;
use crate::device::{Device, Precision};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A path that is on, off, or left to the device's default.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// The device's default.
    #[default]
    Auto,
    On,
    Off,
}

impl Switch {
    /// On or off, `default` for `Auto`.
    pub fn or(self, default: bool) -> bool {
        match self {
            Switch::Auto => default,
            Switch::On => true,
            Switch::Off => false,
        }
    }
}

/// The CPU's vector instruction set for elementwise ops and attention.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SimdChoice {
    /// The widest this CPU has.
    #[default]
    Auto,
    Avx512,
    Avx2,
    Baseline,
}

/// Every choice of code path that can change a result, as given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComputeOptions {
    /// Training on a loss of the logits alone runs the last block after
    /// attention on the class-token rows, and a logits-only pass computes
    /// that block's query and attention for the class token alone
    /// (`model::vit`, module doc).
    pub class_token_tail: Switch,
    /// A small model's training batch is split in two halves computed at
    /// once, each on its share of the threads (`train::Trainer`).
    pub batch_split: Switch,
    /// CUDA attention for sequences of at most 64 tokens on tensor cores.
    pub short_attention: Switch,
    /// The residual adds and the LayerNorms that read them as one op.
    pub fused_add_layernorm: Switch,
    /// The CPU attention backward's AVX-512 register tiles (head dim 16).
    pub attention_tiles: Switch,
    /// CUDA: the kernels only the ViT families other than the plain one
    /// use (`model::family`).
    #[serde(default)]
    pub family_kernels: Switch,
    /// The CPU's vector instruction set.
    pub simd: SimdChoice,
    /// Time every op and print the table at the end (changes no result).
    pub profile: bool,
}

/// The environment variables read as fallbacks, each with the option it
/// stands for and what `1` means.
pub const ENV_FALLBACKS: [(&str, &str); 8] = [
    ("EFFRANK_EVERY_TOKEN", "--class-token-tail off"),
    ("EFFRANK_CUDA_CLASS_TOKEN_TAIL", "--class-token-tail on"),
    ("EFFRANK_WHOLE_BATCHES", "--batch-split off"),
    ("EFFRANK_CUDA_SHORT_ATTENTION", "--short-attention on"),
    ("EFFRANK_CUDA_FUSED_ADD_LN", "--fused-add-layernorm on"),
    ("EFFRANK_ATTENTION_PRODUCTS", "--attention-tiles off"),
    ("EFFRANK_SIMD", "--simd <level>"),
    ("EFFRANK_PROFILE", "--profile"),
];

/// An on/off environment variable by the one rule: unset, empty or `0` is
/// `false`, `1` is `true`, anything else an error naming the variable.
pub fn switch_from_env(var: &str, value: Option<&str>) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => bail!("{var}={other}: use 1 (on) or 0 (off), or unset it"),
    }
}

impl ComputeOptions {
    /// Every path that is off by default on (what the CUDA tests and the
    /// step bench compare with the default paths).
    pub fn every_path() -> Self {
        ComputeOptions {
            class_token_tail: Switch::On,
            batch_split: Switch::Auto,
            short_attention: Switch::On,
            fused_add_layernorm: Switch::On,
            family_kernels: Switch::On,
            ..Default::default()
        }
    }

    /// The options the environment variables ask for (`ENV_FALLBACKS`).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|v| std::env::var(v).ok())
    }

    /// `from_env` with the variables read through `get` (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let on = |var: &str| switch_from_env(var, get(var).as_deref());
        let (every_token, cuda_tail) = (
            on("EFFRANK_EVERY_TOKEN")?,
            on("EFFRANK_CUDA_CLASS_TOKEN_TAIL")?,
        );
        if every_token && cuda_tail {
            bail!("EFFRANK_EVERY_TOKEN=1 and EFFRANK_CUDA_CLASS_TOKEN_TAIL=1 contradict each other: set one");
        }
        let switch = |on: bool, value: Switch| if on { value } else { Switch::Auto };
        let simd = match get("EFFRANK_SIMD").as_deref().map(str::trim) {
            None | Some("") | Some("auto") => SimdChoice::Auto,
            Some("avx512") => SimdChoice::Avx512,
            Some("avx2") => SimdChoice::Avx2,
            Some("baseline") => SimdChoice::Baseline,
            Some(other) => {
                bail!("EFFRANK_SIMD={other}: use avx512, avx2, baseline or auto, or unset it")
            }
        };
        Ok(ComputeOptions {
            class_token_tail: if every_token {
                Switch::Off
            } else {
                switch(cuda_tail, Switch::On)
            },
            batch_split: switch(on("EFFRANK_WHOLE_BATCHES")?, Switch::Off),
            short_attention: switch(on("EFFRANK_CUDA_SHORT_ATTENTION")?, Switch::On),
            fused_add_layernorm: switch(on("EFFRANK_CUDA_FUSED_ADD_LN")?, Switch::On),
            attention_tiles: switch(on("EFFRANK_ATTENTION_PRODUCTS")?, Switch::Off),
            family_kernels: Switch::Auto,
            simd,
            profile: on("EFFRANK_PROFILE")?,
        })
    }

    /// The paths a device of `kind` takes with these options.
    pub fn resolve(&self, kind: DeviceKind) -> ComputePaths {
        let cpu = kind == DeviceKind::Cpu;
        // The CUDA class-token tail and the two fused kernels are off until a
        // GPU log shows them passing and winning (README, GPU).
        let tail = self.class_token_tail.or(cpu);
        ComputePaths {
            model: ModelPaths {
                class_token_tail: tail,
                class_token_query: tail,
                batch_split: self.batch_split.or(cpu),
                fused_add_layernorm: !cpu && self.fused_add_layernorm.or(false),
                family_kernels: cpu || self.family_kernels.or(false),
            },
            short_attention: !cpu && self.short_attention.or(false),
            attention_tiles: self.attention_tiles.or(true),
            simd: self.simd,
        }
    }
}

/// The model's own choices of path (`Vit::paths`): fixed when the model is
/// made, from the options resolved for its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelPaths {
    /// Training on a loss of the logits alone runs `forward_logits` and its
    /// backward: the last block after attention on the class-token rows.
    pub class_token_tail: bool,
    /// A logits-only pass computes the last block's query and attention for
    /// the class token alone; else for every token, keeping the class-token
    /// rows.
    pub class_token_query: bool,
    /// A small model's training batch is split in two halves computed at
    /// once (`train::Trainer::new`).
    pub batch_split: bool,
    /// Residual adds and the LayerNorms that read them as one op
    /// (`ops::add_layernorm`).
    pub fused_add_layernorm: bool,
    /// The model may be of a family other than the plain ViT (its kernels
    /// are on for the CPU; on CUDA they have not run on a GPU yet, so a
    /// model that needs them is refused unless asked for).
    #[serde(default)]
    pub family_kernels: bool,
}

impl ModelPaths {
    /// The default paths of a device of `kind` (every option `auto`).
    pub fn default_for(kind: DeviceKind) -> Self {
        ComputeOptions::default().resolve(kind).model
    }

    /// The default paths of `be`'s kind (tests, benches, and library code
    /// that runs with no options).
    pub fn default_of<D: Device>(be: &D) -> Self {
        Self::default_for(be.kind())
    }
}

/// Every path one run takes on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ComputePaths {
    pub model: ModelPaths,
    /// CUDA only: the short-sequence attention kernels.
    pub short_attention: bool,
    /// CPU only: the attention backward may take the AVX-512 tiles.
    pub attention_tiles: bool,
    /// CPU only: the vector instruction set asked for.
    pub simd: SimdChoice,
}

/// The engine's version, and the git commit it was built from when known.
pub fn engine_version() -> String {
    match option_env!("EFFRANK_GIT_COMMIT") {
        Some(commit) if !commit.is_empty() => {
            format!("{} ({commit})", env!("CARGO_PKG_VERSION"))
        }
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// What produced a result: recorded in every checkpoint a run writes
/// (`provenance::RunMeta::compute`) and hashed into the teacher-logit cache
/// key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeRecord {
    /// `engine_version()`: the crate version and git commit.
    pub engine: String,
    pub device: DeviceKind,
    /// The device as it names itself (`Device::name`: the GPU's model).
    pub device_name: String,
    pub precision: Precision,
    /// The options as given (`auto` where left to the device).
    pub options: ComputeOptions,
    /// The paths they resolved to on this device.
    pub paths: ComputePaths,
}

impl ComputeRecord {
    /// The record of a run with `options` on a device.
    pub fn new(
        options: &ComputeOptions,
        device: DeviceKind,
        device_name: String,
        precision: Precision,
    ) -> Self {
        ComputeRecord {
            engine: engine_version(),
            device,
            device_name,
            precision,
            options: *options,
            paths: options.resolve(device),
        }
    }

    /// The record of a run with `options` on `be`.
    pub fn for_device<D: Device>(options: &ComputeOptions, be: &D) -> Self {
        Self::new(options, be.kind(), be.name(), be.precision())
    }

    /// The part of the record that can change a computed number, as text
    /// for a cache key: everything except the device's display name (the
    /// CPU's thread count changes no bit) and `profile`.
    pub fn cache_key(&self) -> String {
        let options = ComputeOptions {
            profile: false,
            ..self.options
        };
        format!(
            "engine={} device={:?} precision={:?} options={} paths={}",
            self.engine,
            self.device,
            self.precision,
            serde_json::to_string(&options).unwrap_or_default(),
            serde_json::to_string(&self.paths).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |v| {
            pairs
                .iter()
                .find(|(k, _)| *k == v)
                .map(|(_, x)| x.to_string())
        }
    }

    #[test]
    fn unset_and_zero_are_auto_one_is_the_named_path_anything_else_an_error() {
        assert_eq!(
            ComputeOptions::from_lookup(env(&[])).unwrap(),
            ComputeOptions::default()
        );
        for (var, _) in ENV_FALLBACKS {
            if var == "EFFRANK_SIMD" {
                continue;
            }
            let zero = ComputeOptions::from_lookup(env(&[(var, "0")])).unwrap();
            assert_eq!(
                zero,
                ComputeOptions::default(),
                "{var}=0 must change nothing"
            );
            let one = ComputeOptions::from_lookup(env(&[(var, "1")])).unwrap();
            assert_ne!(one, ComputeOptions::default(), "{var}=1 must switch a path");
            let e = ComputeOptions::from_lookup(env(&[(var, "yes")])).unwrap_err();
            assert!(e.to_string().contains(var), "{e}");
        }
        let e = ComputeOptions::from_lookup(env(&[("EFFRANK_SIMD", "avx9")])).unwrap_err();
        assert!(e.to_string().contains("EFFRANK_SIMD=avx9"), "{e}");
        let o = ComputeOptions::from_lookup(env(&[("EFFRANK_SIMD", "avx2")])).unwrap();
        assert_eq!(o.simd, SimdChoice::Avx2);
        assert!(ComputeOptions::from_lookup(env(&[
            ("EFFRANK_EVERY_TOKEN", "1"),
            ("EFFRANK_CUDA_CLASS_TOKEN_TAIL", "1")
        ]))
        .is_err());
    }

    #[test]
    fn defaults_resolve_per_device() {
        let cpu = ComputeOptions::default().resolve(DeviceKind::Cpu);
        assert!(cpu.model.class_token_tail && cpu.model.batch_split);
        assert!(!cpu.model.fused_add_layernorm && !cpu.short_attention);
        let cuda = ComputeOptions::default().resolve(DeviceKind::Cuda);
        assert!(!cuda.model.class_token_tail && !cuda.model.batch_split);
        assert!(!cuda.model.fused_add_layernorm && !cuda.short_attention);
        let on = ComputeOptions {
            class_token_tail: Switch::On,
            short_attention: Switch::On,
            fused_add_layernorm: Switch::On,
            ..Default::default()
        };
        let cuda = on.resolve(DeviceKind::Cuda);
        assert!(cuda.model.class_token_tail && cuda.model.class_token_query);
        assert!(cuda.model.fused_add_layernorm && cuda.short_attention);
        // The CUDA-only paths do not exist on the CPU.
        let cpu = on.resolve(DeviceKind::Cpu);
        assert!(!cpu.model.fused_add_layernorm && !cpu.short_attention);
    }

    #[test]
    fn every_option_but_profile_changes_the_cache_key() {
        let record = |o: ComputeOptions| {
            ComputeRecord::new(&o, DeviceKind::Cpu, "cpu".into(), Precision::F32).cache_key()
        };
        let base = record(ComputeOptions::default());
        let changed = [
            ComputeOptions {
                class_token_tail: Switch::Off,
                ..Default::default()
            },
            ComputeOptions {
                batch_split: Switch::Off,
                ..Default::default()
            },
            ComputeOptions {
                short_attention: Switch::On,
                ..Default::default()
            },
            ComputeOptions {
                fused_add_layernorm: Switch::On,
                ..Default::default()
            },
            ComputeOptions {
                attention_tiles: Switch::Off,
                ..Default::default()
            },
            ComputeOptions {
                simd: SimdChoice::Baseline,
                ..Default::default()
            },
        ];
        for o in changed {
            assert_ne!(record(o), base, "{o:?} must change the cache key");
        }
        let profiled = ComputeOptions {
            profile: true,
            ..Default::default()
        };
        assert_eq!(record(profiled), base);
        let cuda = ComputeRecord::new(
            &ComputeOptions::default(),
            DeviceKind::Cuda,
            "gpu".into(),
            Precision::Bf16,
        );
        assert_ne!(cuda.cache_key(), base);
    }
}
