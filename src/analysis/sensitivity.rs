//! Per-layer sensitivity (`effrank-engine sensitivity`): each factorizable
//! layer factorized alone at each rank of a grid, the rest of the teacher
//! dense, measured on a calibration split of the training set against the
//! teacher. No training: inference passes only, batched, on any `Backend`.
//!
//! For each (layer, rank) point: the KD loss against the teacher,
//! `T² · mean_i KL(softmax(t_i / T) ‖ softmax(s_i / T))` (the KD term of
//! `--loss kd`, at the same temperature), and top-1 on the split's labels.
//! The teacher's own KD loss is 0, so a point's KD loss is the loss
//! increase the layer alone causes: what `factorize::budget` allocates
//! ranks from. Each layer's curve ends at its full rank min(out, in), where
//! the layer is kept dense: a full-rank factorization is the dense layer
//! (up to rounding) and more parameters than it, so that point is the
//! teacher, measured by the same pass.
//!
//! A layer's own effective rank is the smallest measured rank whose top-1
//! reaches `hi` (95%) of the teacher's on the split, and the `lo` (85%)
//! one likewise; both are grid ranks (or the full rank), not interpolated.
//!
//! The calibration split is `images` training images taken at an even
//! stride over the set (the i-th is image ⌊i · len / images⌋), so an image
//! folder sorted by class gives every class its share, with no seed.

use crate::data::{augmented_batch, Augment, Dataset};
use crate::factorize::budget::LayerLoss;
use crate::factorize::{factorize, FactorInit, InputMoments};
use crate::model::params::{dense_ranks, BlockLinear, Ranks};
use crate::model::{Vit, VitConfig, VitParams};
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use crate::options::ModelPaths;
use crate::train::step::count_correct;
use crate::train::Frozen;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What the sensitivity pass measures and how.
#[derive(Clone, Debug)]
pub struct SensitivitySettings {
    /// Ranks to factorize each layer at (those below a layer's full rank
    /// are measured; the full rank is always added, dense).
    pub ranks: Vec<usize>,
    /// Which layers: `Some(_)` for the layers to measure.
    pub layers: Ranks,
    pub init: FactorInit,
    /// KD temperature T.
    pub temperature: f32,
    /// Images per forward pass.
    pub batch: usize,
    /// Fractions of the teacher's top-1 for the two effective ranks.
    pub lo: f64,
    pub hi: f64,
}

/// The calibration split: training images at an even stride, and the
/// transform that makes them the model's input.
pub struct Probe<'a> {
    pub data: &'a Dataset,
    pub transform: &'a ImageTransform,
    pub indices: Vec<usize>,
}

impl<'a> Probe<'a> {
    /// `images` images of `data` at an even stride (all when fewer).
    pub fn new(data: &'a Dataset, transform: &'a ImageTransform, images: usize) -> Result<Self> {
        let len = data.len();
        let n = images.min(len);
        if n == 0 {
            bail!("the sensitivity pass needs at least one calibration image (--images {images}, {len} training images)");
        }
        Ok(Probe {
            data,
            transform,
            indices: (0..n).map(|i| i * len / n).collect(),
        })
    }
}

/// One measured point of a layer's curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensitivityPoint {
    pub rank: usize,
    /// True at the full rank, where the layer is kept dense.
    pub dense: bool,
    /// KD loss against the teacher (the teacher's own is 0).
    pub kd: f64,
    pub top1: f64,
}

/// One layer's curve and its own effective ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSensitivity {
    pub block: usize,
    /// q, k, v, proj, fc1 or fc2.
    pub layer: String,
    pub out: usize,
    pub inp: usize,
    pub points: Vec<SensitivityPoint>,
    /// Smallest measured rank reaching `lo` of the teacher's top-1.
    pub rank_lo: usize,
    /// Smallest measured rank reaching `hi` of the teacher's top-1.
    pub rank_hi: usize,
}

impl LayerSensitivity {
    pub fn linear(&self) -> Result<BlockLinear> {
        BlockLinear::ALL
            .into_iter()
            .find(|l| l.short() == self.layer)
            .with_context(|| {
                format!(
                    "unknown layer '{}' in block {}: use q, k, v, proj, fc1 or fc2",
                    self.layer, self.block
                )
            })
    }
}

/// Everything the pass measured (`analysis.json` of a sensitivity run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReport {
    /// Calibration images measured on.
    pub images: usize,
    pub init: FactorInit,
    pub temperature: f32,
    pub lo: f64,
    pub hi: f64,
    pub teacher_top1: f64,
    /// The teacher's KD loss against itself through the same pass: 0.
    pub teacher_kd: f64,
    pub grid: Vec<usize>,
    pub layers: Vec<LayerSensitivity>,
    /// Forward passes over the split (the teacher's included).
    pub passes: usize,
    /// Wall seconds of the whole pass.
    pub seconds: f64,
}

/// The dense teacher the layers are taken from, and for `svd-act` the
/// second moments of its layers' inputs (`factorize::calibrate`).
#[derive(Clone, Copy)]
pub struct Subject<'a> {
    pub cfg: &'a VitConfig,
    pub params: &'a VitParams<Vec<f32>>,
    pub moments: Option<&'a InputMoments>,
}

/// Measure every layer `settings.layers` names at every rank of its grid;
/// `progress` is called after each point with (done, total).
pub fn measure<B: Backend>(
    be: &B,
    paths: ModelPaths,
    subject: Subject<'_>,
    probe: &Probe<'_>,
    settings: &SensitivitySettings,
    mut progress: impl FnMut(usize, usize),
) -> Result<SensitivityReport> {
    let Subject {
        cfg,
        params: teacher,
        moments,
    } = subject;
    let started = std::time::Instant::now();
    if settings.ranks.is_empty() || settings.ranks.contains(&0) {
        bail!("the sensitivity grid needs ranks of at least 1");
    }
    let pass = Pass {
        be,
        paths,
        cfg,
        probe,
        batch: settings.batch.max(1),
    };
    let (teacher_logits, labels) = pass.logits(&dense_ranks(cfg), teacher)?;
    let score = |logits: &[f32]| -> (f64, f64) {
        let kd = kd_loss(&teacher_logits, logits, cfg.classes, settings.temperature);
        let top1 = count_correct(logits, &labels, cfg.classes) as f64 / labels.len() as f64;
        (kd, top1)
    };
    let (teacher_kd, teacher_top1) = score(&teacher_logits);
    let todo: Vec<(usize, BlockLinear)> = settings
        .layers
        .iter()
        .enumerate()
        .flat_map(|(b, br)| {
            br.iter()
                .filter(|(_, r)| r.is_some())
                .map(move |(l, _)| (b, l))
        })
        .collect();
    let grid_of = |l: BlockLinear| {
        let (o, i) = l.shape(cfg);
        let full = o.min(i);
        let mut g: Vec<usize> = settings
            .ranks
            .iter()
            .copied()
            .filter(|&r| r < full)
            .collect();
        g.sort_unstable();
        g.dedup();
        (g, full)
    };
    let total: usize = todo.iter().map(|&(_, l)| grid_of(l).0.len() + 1).sum();
    let (mut done, mut passes) = (0, 1);
    let mut layers = Vec::with_capacity(todo.len());
    for (block, lin) in todo {
        let (grid, full) = grid_of(lin);
        let mut points = Vec::with_capacity(grid.len() + 1);
        for r in grid {
            let mut ranks = dense_ranks(cfg);
            ranks[block][lin] = Some(r);
            let (student, _) = factorize(cfg, teacher, &ranks, settings.init, moments)?;
            let (logits, _) = pass.logits(&ranks, &student)?;
            let (kd, top1) = score(&logits);
            points.push(SensitivityPoint {
                rank: r,
                dense: false,
                kd,
                top1,
            });
            passes += 1;
            done += 1;
            progress(done, total);
        }
        points.push(SensitivityPoint {
            rank: full,
            dense: true,
            kd: teacher_kd,
            top1: teacher_top1,
        });
        done += 1;
        progress(done, total);
        let reach = |fraction: f64| {
            points
                .iter()
                .find(|p| p.top1 >= fraction * teacher_top1)
                .map_or(full, |p| p.rank)
        };
        let (out, inp) = lin.shape(cfg);
        layers.push(LayerSensitivity {
            block,
            layer: lin.short().to_string(),
            out,
            inp,
            rank_lo: reach(settings.lo),
            rank_hi: reach(settings.hi),
            points,
        });
    }
    let mut grid = settings.ranks.clone();
    grid.sort_unstable();
    grid.dedup();
    Ok(SensitivityReport {
        images: labels.len(),
        init: settings.init,
        temperature: settings.temperature,
        lo: settings.lo,
        hi: settings.hi,
        teacher_top1,
        teacher_kd,
        grid,
        layers,
        passes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A model's logits over the calibration split, batch by batch.
struct Pass<'a, B: Backend> {
    be: &'a B,
    paths: ModelPaths,
    cfg: &'a VitConfig,
    probe: &'a Probe<'a>,
    batch: usize,
}

impl<B: Backend> Pass<'_, B> {
    /// Logits `[n, classes]` and labels of the split.
    fn logits(&self, ranks: &Ranks, params: &VitParams<Vec<f32>>) -> Result<(Vec<f32>, Vec<u32>)> {
        let model = Vit::from_host(self.be, self.cfg, ranks, params, self.paths)?;
        let mut frozen = Frozen::new(self.be, model, self.batch)?;
        let n = self.probe.indices.len();
        let (mut all, mut all_labels) = (Vec::with_capacity(n * self.cfg.classes), Vec::new());
        let (mut bytes, mut labels) = (Vec::new(), Vec::new());
        for chunk in self.probe.indices.chunks(self.batch) {
            augmented_batch(
                self.probe.data,
                chunk,
                &Augment::NONE,
                0,
                0,
                &mut bytes,
                &mut labels,
            )?;
            all.extend(frozen.logits(self.be, &bytes, chunk.len(), self.probe.transform)?);
            all_labels.extend_from_slice(&labels);
        }
        Ok((all, all_labels))
    }
}

/// `T² · mean_i KL(softmax(t_i / T) ‖ softmax(s_i / T))`, in f64. Equal
/// logits give exactly 0.
pub fn kd_loss(teacher: &[f32], student: &[f32], classes: usize, temperature: f32) -> f64 {
    let t = temperature as f64;
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
        let sum: f64 = row.iter().map(|&v| (v as f64 / t - max).exp()).sum();
        let log_sum = sum.ln() + max;
        row.iter().map(|&v| v as f64 / t - log_sum).collect()
    };
    let rows = teacher.len() / classes.max(1);
    let mut total = 0.0;
    for (a, b) in teacher.chunks(classes).zip(student.chunks(classes)) {
        let (lt, ls) = (log_softmax(a), log_softmax(b));
        total += lt
            .iter()
            .zip(&ls)
            .map(|(p, q)| p.exp() * (p - q))
            .sum::<f64>();
    }
    t * t * total / rows.max(1) as f64
}

impl SensitivityReport {
    /// Read a sensitivity run's `analysis.json` (or the folder holding it).
    pub fn read(path: &Path) -> Result<SensitivityReport> {
        let file = Self::file(path);
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading the sensitivity curves {}", file.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a sensitivity analysis.json (run effrank-engine sensitivity)",
                file.display()
            )
        })
    }

    /// The `analysis.json` that `path` names (itself, or in the folder).
    pub fn file(path: &Path) -> std::path::PathBuf {
        if path.is_dir() {
            path.join("analysis.json")
        } else {
            path.to_path_buf()
        }
    }

    /// Each layer's loss increase against rank, for `factorize::budget`.
    pub fn loss_curves(&self) -> Result<Vec<LayerLoss>> {
        self.layers
            .iter()
            .map(|l| {
                Ok(LayerLoss {
                    block: l.block,
                    layer: l.linear()?,
                    points: l
                        .points
                        .iter()
                        .map(|p| (p.rank, p.kd - self.teacher_kd))
                        .collect(),
                })
            })
            .collect()
    }

    /// summary.md: one row per layer, the KD loss at each grid rank and
    /// the layer's own effective ranks.
    pub fn summary_md(&self) -> String {
        let mut s = format!(
            "# Per-layer sensitivity\n\nEach layer factorized alone ({}), the rest of the teacher dense; KD loss (T = {}) against the teacher and top-1 on {} calibration images (teacher top-1 {:.2}%). r{:.0} and r{:.0}: the smallest measured rank keeping {:.0}% and {:.0}% of the teacher's top-1. Measured in {:.1} s ({} forward passes over the split).\n\n",
            init_name(self.init),
            self.temperature,
            self.images,
            100.0 * self.teacher_top1,
            100.0 * self.hi,
            100.0 * self.lo,
            100.0 * self.hi,
            100.0 * self.lo,
            self.seconds,
            self.passes,
        );
        s += "| layer |";
        for r in &self.grid {
            s += &format!(" KD r={r} |");
        }
        s += &format!(
            " r{:.0} | r{:.0} |\n|---|",
            100.0 * self.hi,
            100.0 * self.lo
        );
        s += &"---|".repeat(self.grid.len() + 2);
        s.push('\n');
        for l in &self.layers {
            s += &format!("| blocks.{}.{} |", l.block, l.layer);
            for r in &self.grid {
                match l.points.iter().find(|p| p.rank == *r && !p.dense) {
                    Some(p) => s += &format!(" {:.4} ({:.1}%) |", p.kd, 100.0 * p.top1),
                    None => s += " - |",
                }
            }
            s += &format!(" {} | {} |\n", l.rank_hi, l.rank_lo);
        }
        s
    }
}

fn init_name(init: FactorInit) -> &'static str {
    match init {
        FactorInit::Svd => "svd",
        FactorInit::SvdAct { .. } => "svd-act",
        FactorInit::Random { .. } => "random",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::Cpu;
    use crate::rng::Rng;

    #[test]
    fn kd_loss_is_zero_for_equal_logits_and_matches_a_hand_value() {
        let t = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        assert_eq!(kd_loss(&t, &t, 3, 4.0), 0.0);
        // One row, T = 1: KL(p || q) by hand.
        let (a, b) = ([0.0f32, 0.0], [0.0f32, (3.0f32).ln()]);
        let want = 0.5 * (0.5f64 / 0.25).ln() + 0.5 * (0.5f64 / 0.75).ln();
        assert!((kd_loss(&a, &b, 2, 1.0) - want).abs() < 1e-7);
    }

    fn demo() -> (VitConfig, VitParams<Vec<f32>>, Dataset, ImageTransform) {
        let (train, _) = crate::data::demo::generate(&crate::data::DemoConfig {
            train: 64,
            test: 8,
            ..Default::default()
        })
        .unwrap();
        let cfg = VitConfig::preset("vit-demo", train.classes).unwrap();
        let mut rng = Rng::new(9);
        let teacher: VitParams<Vec<f32>> = VitParams::build(&cfg, &dense_ranks(&cfg), |s| {
            Ok::<_, ()>(rng.normal_vec(s.numel(), 0.1))
        })
        .unwrap();
        let transform = crate::data::Normalize::Half
            .transform(&train, cfg.image_size, None)
            .unwrap();
        (cfg, teacher, train, transform)
    }

    /// At full rank a layer's point is the teacher measured by the same
    /// pass: KD exactly 0, top-1 exactly the teacher's. A real full-rank
    /// SVD factorization agrees up to rounding, and a low rank costs loss.
    #[test]
    fn a_layer_at_full_rank_has_the_teachers_loss_exactly() {
        let (cfg, teacher, train, transform) = demo();
        let probe = Probe::new(&train, &transform, 24).unwrap();
        let mut layers = dense_ranks(&cfg);
        layers[1][BlockLinear::Fc2] = Some(1);
        layers[0][BlockLinear::Q] = Some(1);
        let settings = SensitivitySettings {
            ranks: vec![1, 4, 64, 500],
            layers,
            init: FactorInit::Svd,
            temperature: 4.0,
            batch: 10,
            lo: 0.85,
            hi: 0.95,
        };
        let paths = ModelPaths::default_of(&Cpu);
        let mut calls = 0;
        let subject = Subject {
            cfg: &cfg,
            params: &teacher,
            moments: None,
        };
        let r = measure(&Cpu, paths, subject, &probe, &settings, |_, _| calls += 1).unwrap();
        assert_eq!(calls, 6);
        assert_eq!(r.teacher_kd, 0.0);
        assert_eq!(r.layers.len(), 2);
        let q = &r.layers[0];
        assert_eq!((q.block, q.layer.as_str()), (0, "q"));
        let ranks: Vec<usize> = q.points.iter().map(|p| p.rank).collect();
        assert_eq!(
            ranks,
            vec![1, 4, 64],
            "grid cut below the full rank 64, which is added"
        );
        let full = q.points.last().unwrap();
        assert!(full.dense && full.kd == 0.0 && full.top1 == r.teacher_top1);
        assert!(q.points[0].kd > 0.0, "rank 1 of q changes the logits");
        // The full-rank SVD factorization through the same pass.
        let pass = Pass {
            be: &Cpu,
            paths,
            cfg: &cfg,
            probe: &probe,
            batch: 10,
        };
        let mut ranks = dense_ranks(&cfg);
        ranks[0][BlockLinear::Q] = Some(64);
        let (student, _) = factorize(&cfg, &teacher, &ranks, FactorInit::Svd, None).unwrap();
        let (teacher_logits, _) = pass.logits(&dense_ranks(&cfg), &teacher).unwrap();
        let (logits, _) = pass.logits(&ranks, &student).unwrap();
        assert!(kd_loss(&teacher_logits, &logits, cfg.classes, 4.0) < 1e-8);
        // Curves for the allocation: the increase over the teacher.
        let curves = r.loss_curves().unwrap();
        assert_eq!(curves[1].layer, BlockLinear::Fc2);
        assert_eq!(curves[1].points.last(), Some(&(64, 0.0)));
    }

    #[test]
    fn a_report_round_trips_through_json_and_names_bad_layers() {
        let (cfg, teacher, train, transform) = demo();
        let probe = Probe::new(&train, &transform, 8).unwrap();
        let mut layers = dense_ranks(&cfg);
        layers[0][BlockLinear::V] = Some(1);
        let settings = SensitivitySettings {
            ranks: vec![2],
            layers,
            init: FactorInit::Svd,
            temperature: 4.0,
            batch: 8,
            lo: 0.85,
            hi: 0.95,
        };
        let paths = ModelPaths::default_of(&Cpu);
        let subject = Subject {
            cfg: &cfg,
            params: &teacher,
            moments: None,
        };
        let r = measure(&Cpu, paths, subject, &probe, &settings, |_, _| {}).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("analysis.json"),
            serde_json::to_string(&r).unwrap(),
        )
        .unwrap();
        assert_eq!(SensitivityReport::read(dir.path()).unwrap(), r);
        assert!(r.summary_md().contains("| blocks.0.v |"));
        let mut bad = r.clone();
        bad.layers[0].layer = "qq".into();
        let e = bad.loss_curves().unwrap_err().to_string();
        assert!(e.contains("'qq'"), "{e}");
        assert!(Probe::new(&train, &transform, 0).is_err());
    }
}
