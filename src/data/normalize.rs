//! Per-channel normalization presets for `--normalize cifar|imagenet|half|clip`:
//! the model sees `(pixel / 255 - mean[c]) / std[c]`. The arithmetic happens
//! on the device (`ops::image::from_bytes`); this file only names the
//! constants and builds the `ImageTransform` that carries them there.

use super::Dataset;
use crate::ops::image::ImageTransform;
use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// CIFAR-100 training-set statistics.
    Cifar,
    /// ImageNet statistics (torchvision and timm ImageNet checkpoints).
    Imagenet,
    /// mean 0.5, std 0.5 (Hugging Face ViT checkpoints; maps [0, 1] to [-1, 1]).
    Half,
    /// OpenAI CLIP's statistics (CLIP image towers, timm's and Hugging Face's).
    Clip,
}

impl Normalize {
    pub const ALL: [Normalize; 4] = [
        Normalize::Cifar,
        Normalize::Imagenet,
        Normalize::Half,
        Normalize::Clip,
    ];

    /// The preset of these statistics (as a config file gives them), if
    /// any is within 1e-4 of them.
    pub fn from_stats(mean: [f64; 3], std: [f64; 3]) -> Option<Normalize> {
        let near =
            |a: [f32; 3], b: [f64; 3]| a.iter().zip(b).all(|(&a, b)| (a as f64 - b).abs() < 1e-4);
        Normalize::ALL
            .into_iter()
            .find(|n| near(n.mean(), mean) && near(n.std(), std))
    }

    pub fn name(self) -> &'static str {
        match self {
            Normalize::Cifar => "cifar",
            Normalize::Imagenet => "imagenet",
            Normalize::Half => "half",
            Normalize::Clip => "clip",
        }
    }

    pub fn mean(self) -> [f32; 3] {
        match self {
            Normalize::Cifar => [0.5071, 0.4865, 0.4409],
            Normalize::Imagenet => [0.485, 0.456, 0.406],
            Normalize::Half => [0.5; 3],
            Normalize::Clip => [0.481_454_66, 0.457_827_5, 0.408_210_73],
        }
    }

    pub fn std(self) -> [f32; 3] {
        match self {
            Normalize::Cifar => [0.2673, 0.2564, 0.2762],
            Normalize::Imagenet => [0.229, 0.224, 0.225],
            Normalize::Half => [0.5; 3],
            Normalize::Clip => [0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }

    /// The transform taking `ds`'s stored images to model input of
    /// `model_size` x `model_size` (through `resize` x `resize` and a center
    /// crop when given), normalized with this preset. Only 3-channel images
    /// are supported (the presets have three channels).
    pub fn transform(
        self,
        ds: &Dataset,
        model_size: usize,
        resize: Option<usize>,
    ) -> Result<ImageTransform> {
        if ds.channels != 3 {
            bail!(
                "normalization '{}' needs 3-channel images, the data set has {}",
                self.name(),
                ds.channels
            );
        }
        Ok(ImageTransform {
            channels: 3,
            src_height: ds.height,
            src_width: ds.width,
            dst_size: model_size,
            mean: self.mean(),
            std: self.std(),
            resize,
        })
    }
}

impl fmt::Display for Normalize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Normalize {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match Normalize::ALL
            .iter()
            .find(|n| n.name() == s.to_ascii_lowercase())
        {
            Some(&n) => Ok(n),
            None => {
                let names: Vec<&str> = Normalize::ALL.iter().map(|n| n.name()).collect();
                bail!("unknown normalization '{s}'; choices: {}", names.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_name_their_preset() {
        // timm's IMAGENET_DEFAULT_*, IMAGENET_INCEPTION_* and OPENAI_CLIP_*.
        let f = |v: [f32; 3]| v.map(f64::from);
        for n in Normalize::ALL {
            assert_eq!(Normalize::from_stats(f(n.mean()), f(n.std())), Some(n));
        }
        assert_eq!(
            Normalize::from_stats([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            Some(Normalize::Imagenet)
        );
        assert_eq!(Normalize::from_stats([0.5; 3], [0.25; 3]), None);
    }

    #[test]
    fn parses_every_name_and_lists_choices_on_error() {
        for n in Normalize::ALL {
            assert_eq!(n.name().parse::<Normalize>().unwrap(), n);
            assert_eq!(n.to_string().parse::<Normalize>().unwrap(), n);
        }
        assert_eq!(
            "ImageNet".parse::<Normalize>().unwrap(),
            Normalize::Imagenet
        );
        let err = "imgnet".parse::<Normalize>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown normalization 'imgnet'; choices: cifar, imagenet, half, clip"
        );
    }

    #[test]
    fn transform_carries_geometry_and_constants() {
        let ds = Dataset::new(vec![0; 3 * 32 * 32], vec![0], 1, None, (3, 32, 32)).unwrap();
        let t = Normalize::Cifar.transform(&ds, 224, None).unwrap();
        assert_eq!(
            (t.src_height, t.src_width, t.dst_size, t.channels, t.resize),
            (32, 32, 224, 3, None)
        );
        assert_eq!(
            Normalize::Imagenet
                .transform(&ds, 224, Some(256))
                .unwrap()
                .resize,
            Some(256)
        );
        assert_eq!(t.mean, [0.5071, 0.4865, 0.4409]);
        assert_eq!(t.std, [0.2673, 0.2564, 0.2762]);
        let grey = Dataset::new(vec![0; 4], vec![0], 1, None, (1, 2, 2)).unwrap();
        assert!(Normalize::Half
            .transform(&grey, 2, None)
            .unwrap_err()
            .to_string()
            .contains("3-channel"));
    }

    #[test]
    fn works_as_a_clap_value() {
        #[derive(clap::Parser)]
        struct Cli {
            #[arg(long, default_value = "cifar")]
            normalize: Normalize,
        }
        use clap::Parser;
        assert_eq!(
            Cli::try_parse_from(["x", "--normalize", "half"])
                .unwrap()
                .normalize,
            Normalize::Half
        );
        assert_eq!(
            Cli::try_parse_from(["x"]).unwrap().normalize,
            Normalize::Cifar
        );
        let err = Cli::try_parse_from(["x", "--normalize", "bad"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("choices: cifar, imagenet, half"), "{err}");
    }
}
