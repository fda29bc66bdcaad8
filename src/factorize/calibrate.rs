//! Calibration of `--init svd-act`: the second moment `C = XᵀX / n` of the
//! input of every layer a student factorizes, over the token rows of the
//! first N training images, un-augmented, through the teacher on the CPU
//! (the reference path, so a student starts the same on every machine).
//!
//! The inputs are activations the forward pass already keeps (`VitActs`):
//! the first LayerNorm's output for q, k and v (one moment for the three),
//! the attention output before the projection for proj, the second
//! LayerNorm's output for fc1, and the GELU output for fc2. Only the
//! moments of factorized layers are accumulated.

use crate::data::{augmented_batch, Augment, Dataset};
use crate::device::Cpu;
use crate::model::params::{dense_ranks, BlockLinear, Ranks};
use crate::model::vit::BlockActs;
use crate::model::{Vit, VitConfig, VitParams};
use crate::ops::image::{self, ImageTransform};
use crate::ops::matmul;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

/// Images per calibration forward pass.
const BATCH: usize = 32;

/// Which activation of a block a layer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Input {
    Ln1,
    Attn,
    Ln2,
    Hidden,
}

impl Input {
    fn of(l: BlockLinear) -> Input {
        match l {
            BlockLinear::Q | BlockLinear::K | BlockLinear::V => Input::Ln1,
            BlockLinear::Proj => Input::Attn,
            BlockLinear::Fc1 => Input::Ln2,
            BlockLinear::Fc2 => Input::Hidden,
        }
    }

    /// The activation, `[rows, dim]`.
    fn rows(self, a: &BlockActs<Vec<f32>>) -> &Vec<f32> {
        match self {
            Input::Ln1 => &a.ln1,
            Input::Attn => &a.attn,
            Input::Ln2 => &a.ln2,
            Input::Hidden => &a.fc1_act,
        }
    }
}

/// The second moments of the factorized layers' inputs, per block:
/// `[dim, dim]` row-major, f64.
#[derive(Debug)]
pub struct InputMoments {
    blocks: Vec<BTreeMap<Input, Vec<f64>>>,
    /// Token rows each moment averages over.
    pub rows: usize,
}

impl InputMoments {
    /// The second moment of the input of layer `l` of block `block`, when
    /// that layer was factorized at calibration.
    pub fn of(&self, block: usize, l: BlockLinear) -> Option<&[f64]> {
        self.blocks
            .get(block)?
            .get(&Input::of(l))
            .map(|c| c.as_slice())
    }
}

/// Accumulate the second moments of the inputs of every layer `ranks`
/// factorizes over the first `images` training images (all of them when
/// the set is smaller), through the dense `teacher` on the CPU.
pub fn calibrate(
    cfg: &VitConfig,
    teacher: &VitParams<Vec<f32>>,
    ranks: &Ranks,
    train: &Dataset,
    transform: &ImageTransform,
    images: usize,
) -> Result<InputMoments> {
    let n = images.min(train.len());
    if n == 0 {
        bail!("svd-act calibration needs at least one training image (--calibration {images}, {} training images)", train.len());
    }
    let model = Vit::from_host(
        &Cpu,
        cfg,
        &dense_ranks(cfg),
        teacher,
        crate::options::ModelPaths::default_of(&Cpu),
    )
    .context("building the teacher for svd-act calibration")?;
    // Inference activations (two blocks' slots): each block's inputs are
    // read as soon as it is done.
    let mut acts = model.new_inference_acts(&Cpu, BATCH.min(n))?;
    let max_rows = acts.max_batch * cfg.tokens();
    let mut sums: Vec<BTreeMap<Input, Vec<f64>>> = ranks
        .iter()
        .map(|b| {
            b.iter()
                .filter(|(_, r)| r.is_some())
                .map(|(l, _)| (Input::of(l), Vec::new()))
                .collect()
        })
        .collect();
    let (mut bytes, mut labels, mut product) = (Vec::new(), Vec::new(), Vec::new());
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(BATCH) {
        augmented_batch(train, chunk, &Augment::NONE, 0, 0, &mut bytes, &mut labels)?;
        image::from_bytes(&Cpu, &mut acts.images, &bytes, chunk.len(), transform)?;
        let rows = chunk.len() * cfg.tokens();
        model.forward_each_block(&Cpu, &mut acts, chunk.len(), &mut |l, block| {
            for (input, total) in sums[l].iter_mut() {
                let x = input.rows(block);
                let dim = x.len() / max_rows;
                product.resize(dim * dim, 0.0);
                // XᵀX of this batch's rows: [dim, rows] · [rows, dim].
                matmul::matmul(
                    &Cpu,
                    &mut product,
                    x,
                    x,
                    matmul::Gemm::new(dim, dim, rows).a_t(),
                )?;
                total.resize(dim * dim, 0.0);
                for (t, p) in total.iter_mut().zip(&product) {
                    *t += *p as f64;
                }
            }
            Ok(())
        })?;
    }
    let rows = n * cfg.tokens();
    for total in sums.iter_mut().flat_map(|b| b.values_mut()) {
        total.iter_mut().for_each(|v| *v /= rows as f64);
    }
    Ok(InputMoments { blocks: sums, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalize;
    use crate::model::init::init_params;
    use crate::model::params::uniform_ranks;

    fn data(n: usize) -> Dataset {
        let mut rng = crate::rng::Rng::new(4);
        let pixels = (0..n * 3 * 16 * 16).map(|_| rng.below(256) as u8).collect();
        Dataset::new(
            pixels,
            (0..n as u32).map(|i| i % 10).collect(),
            10,
            None,
            (3, 16, 16),
        )
        .unwrap()
    }

    /// The moment of fc2's input equals `XᵀX / n` of the GELU outputs of a
    /// plain forward of the same images, and only factorized inputs are kept.
    #[test]
    fn moments_are_the_second_moments_of_the_forward_activations() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let dense = dense_ranks(&cfg);
        let teacher = init_params(&cfg, &dense, 1);
        let train = data(40);
        let t = Normalize::Half
            .transform(&train, cfg.image_size, None)
            .unwrap();
        let mut ranks = dense.clone();
        ranks[1][BlockLinear::Fc2] = Some(4);
        let m = calibrate(&cfg, &teacher, &ranks, &train, &t, 35).unwrap();
        assert_eq!(m.rows, 35 * cfg.tokens());
        assert!(m.of(0, BlockLinear::Fc2).is_none() && m.of(1, BlockLinear::Q).is_none());
        let got = m.of(1, BlockLinear::Fc2).unwrap();
        let model = Vit::from_host(
            &Cpu,
            &cfg,
            &dense,
            &teacher,
            crate::options::ModelPaths::default_of(&Cpu),
        )
        .unwrap();
        let mut acts = model.new_acts(&Cpu, 35).unwrap();
        let (mut bytes, mut labels) = (Vec::new(), Vec::new());
        augmented_batch(
            &train,
            &(0..35).collect::<Vec<_>>(),
            &Augment::NONE,
            0,
            0,
            &mut bytes,
            &mut labels,
        )
        .unwrap();
        image::from_bytes(&Cpu, &mut acts.images, &bytes, 35, &t).unwrap();
        model.forward(&Cpu, &mut acts, 35).unwrap();
        let h = &acts.blocks[1].fc1_act;
        let (rows, dim) = (35 * cfg.tokens(), cfg.mlp);
        for (i, j) in [(0, 0), (3, 17), (127, 5)] {
            let want: f64 = (0..rows)
                .map(|n| h[n * dim + i] as f64 * h[n * dim + j] as f64)
                .sum::<f64>()
                / rows as f64;
            assert!(
                (got[i * dim + j] - want).abs() < 1e-5 * want.abs().max(1e-3),
                "C[{i}, {j}] = {} vs {want}",
                got[i * dim + j]
            );
        }
        let all = calibrate(&cfg, &teacher, &uniform_ranks(&cfg, 2), &train, &t, 1000).unwrap();
        assert_eq!(all.rows, 40 * cfg.tokens(), "capped at the training set");
        assert_eq!(
            all.of(0, BlockLinear::K).unwrap(),
            all.of(0, BlockLinear::Q).unwrap(),
            "q, k and v read one input"
        );
        assert!(calibrate(&cfg, &teacher, &ranks, &train, &t, 0)
            .unwrap_err()
            .to_string()
            .contains("--calibration 0"));
    }
}
