//! Factorization of a dense teacher into a low-rank student (METHOD.md step 2).
//!
//! Every targeted layer `y = W x + b` (W: out x in) becomes `y = U (V x) + b`.
//! SVD initialization takes the truncated SVD `W ≈ U_r S_r V_rᵀ` (faer, fp32)
//! and splits the singular values evenly: `U = U_r S_r^½`, `V = S_r^½ V_rᵀ`.
//! Its relative Frobenius error is exact from the spectrum:
//! `‖W - UV‖_F / ‖W‖_F = sqrt(Σ_{i>r} σ_i² / Σ_i σ_i²)`.
//! Activation-aware initialization (`svd-act`, `act.rs`) takes the SVD of
//! `W C^½` instead, C the second moment of the layer's inputs over
//! calibration images (`calibrate.rs`), and maps the factors back.
//! Random initialization draws U and V from N(0, s²) with `s² = σ_w / √r`, so
//! that the entries of `UV` have the standard deviation `σ_w` = 0.02 of a
//! freshly initialized dense layer (timm's `trunc_normal_(std=0.02)`).
//!
//! Which layers are factorized is a `Targets` (`targets.rs`: `--layers`,
//! `--blocks`). What else a student takes from the teacher is
//! `FromTeacher`: by default every tensor that is not factorized (biases,
//! dense layers, patch embedding, class token, positions, LayerNorms,
//! head) is copied; the reference protocol keeps only the patch
//! embedding, class token, position embedding and final LayerNorm and
//! starts the blocks' other tensors and the head fresh (`model::init`).
//! `StudentPlan` bundles the three, and `make_student` applies it.

pub mod act;
pub mod budget;
pub mod calibrate;
pub mod targets;

pub use calibrate::{calibrate, InputMoments};
pub use targets::{BlockRange, LayerSet, Targets};

use crate::data::Dataset;
use crate::model::init::{init_params, random_factor_std};
use crate::model::params::{is_lowrank, validate_ranks, BlockLinear, Linear, Ranks};
use crate::model::{VitConfig, VitParams};
use crate::ops::image::ImageTransform;
use crate::ops::matmul::Gemm;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};

/// How the factors of a student start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FactorInit {
    /// Truncated SVD of the teacher's weight (the default).
    Svd,
    /// Truncated SVD of `W C^½`, C the second moment of the layer's inputs
    /// over the first `calibration` training images (`act.rs`).
    #[serde(rename = "svd-act")]
    SvdAct { calibration: usize },
    /// Fresh random factors, seeded.
    Random { seed: u64 },
}

/// Calibration images of `svd-act` when nothing says otherwise.
pub const DEFAULT_CALIBRATION: usize = 256;

impl std::str::FromStr for FactorInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "svd" => Ok(FactorInit::Svd),
            "svd-act" => Ok(FactorInit::SvdAct {
                calibration: DEFAULT_CALIBRATION,
            }),
            "random" => Ok(FactorInit::Random { seed: 0 }),
            other => bail!("unknown factor initialization '{other}': use svd, svd-act or random"),
        }
    }
}

impl FactorInit {
    /// This initialization with random factors drawn from `seed` (the
    /// others have no seed and are returned as they are).
    pub fn with_seed(self, seed: u64) -> FactorInit {
        match self {
            FactorInit::Random { .. } => FactorInit::Random { seed },
            other => other,
        }
    }
}

/// What a student takes from its teacher besides the factors.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum FromTeacher {
    /// Every tensor that is not factorized (the default).
    All,
    /// The patch embedding, class token, position embedding and final
    /// LayerNorm; every block's other tensors (LayerNorms, biases, dense
    /// layers) and the head start fresh (the reference protocol).
    Embeddings,
}

/// How a student is made from its teacher at a rank: which layers are
/// factorized, how their factors start, what else comes from the teacher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StudentPlan {
    pub init: FactorInit,
    pub targets: Targets,
    pub from_teacher: FromTeacher,
}

impl Default for StudentPlan {
    fn default() -> Self {
        StudentPlan {
            init: FactorInit::Svd,
            targets: Targets::default(),
            from_teacher: FromTeacher::All,
        }
    }
}

/// The images `svd-act` calibrates on, as the model sees them.
#[derive(Clone, Copy)]
pub struct CalibrationData<'a> {
    pub train: &'a Dataset,
    pub transform: &'a ImageTransform,
}

/// What happened to one layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub out: usize,
    pub inp: usize,
    pub rank: usize,
    pub params_before: usize,
    pub params_after: usize,
    /// `‖W - UV‖_F / ‖W‖_F` of the initial factors.
    pub rel_error: f64,
    /// `‖X (W - UV)ᵀ‖_F / ‖X Wᵀ‖_F` on the calibration inputs X, when the
    /// layer was calibrated (svd-act).
    pub output_error: Option<f64>,
    /// The same of plain SVD's factors, for comparison (svd-act only).
    pub svd_output_error: Option<f64>,
}

/// Truncated SVD factors of `w` (`[out, inp]`, row-major) at rank `r`:
/// returns `U: [out, r]`, `V: [r, inp]` and the relative Frobenius error.
pub fn svd_factors(
    w: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    name: &str,
) -> Result<(Vec<f32>, Vec<f32>, f64)> {
    check_layer(w, out, inp, r, name)?;
    let m = faer::Mat::<f32>::from_fn(out, inp, |i, j| w[i * inp + j]);
    let svd = crate::linalg::thin_svd(m.as_ref()).map_err(|e| {
        anyhow::anyhow!("SVD of layer {name} [{out}, {inp}] did not converge: {e:?}")
    })?;
    let (u_full, s, v_full) = (&svd.u, &svd.s, &svd.v);
    let sigma: Vec<f64> = s.iter().map(|&x| x as f64).collect();
    let total: f64 = sigma.iter().map(|x| x * x).sum();
    let tail: f64 = sigma[r..].iter().map(|x| x * x).sum();
    let rel_error = if total > 0.0 {
        (tail / total).sqrt()
    } else {
        0.0
    };
    let mut u = vec![0f32; out * r];
    let mut v = vec![0f32; r * inp];
    for k in 0..r {
        let root = s[k].max(0.0).sqrt();
        for i in 0..out {
            u[i * r + k] = u_full[(i, k)] * root;
        }
        for j in 0..inp {
            v[k * inp + j] = v_full[(j, k)] * root;
        }
    }
    Ok((u, v, rel_error))
}

/// A rank for `w` (`[out, inp]`) in 1..=min(out, inp), and finite values.
fn check_layer(w: &[f32], out: usize, inp: usize, r: usize, name: &str) -> Result<()> {
    if r == 0 || r > out.min(inp) {
        bail!(
            "rank {r} out of range for layer {name} of shape [{out}, {inp}]: must be 1..={}",
            out.min(inp)
        );
    }
    if w.len() != out * inp {
        bail!(
            "layer {name}: weight has {} values, shape [{out}, {inp}] needs {}",
            w.len(),
            out * inp
        );
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        bail!(
            "layer {name}: weight value {} at index {i} is not finite",
            w[i]
        );
    }
    Ok(())
}

/// Random factors whose product has the spread of a fresh dense layer, and
/// the relative error of that product against `w`.
pub fn random_factors(
    w: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<f32>, f64) {
    let s = random_factor_std(r);
    let u = rng.normal_vec(out * r, s);
    let v = rng.normal_vec(r * inp, s);
    let rel_error = relative_error(w, &u, &v, out, inp, r);
    (u, v, rel_error)
}

/// `‖W - UV‖_F / ‖W‖_F`, computed directly (f64 accumulation).
pub fn relative_error(w: &[f32], u: &[f32], v: &[f32], out: usize, inp: usize, r: usize) -> f64 {
    let mut uv = vec![0f32; out * inp];
    crate::ops::matmul::cpu::matmul(&mut uv, u, v, Gemm::new(out, inp, r));
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in w.iter().zip(&uv) {
        num += ((a - b) as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    }
}

/// Factorize a dense model at `ranks`. Layers whose rank is `None` stay
/// dense; everything else is copied from the teacher. `moments` holds the
/// inputs' second moments for `svd-act` (`calibrate`). Returns the
/// student's parameters and a report per factorized layer.
pub fn factorize(
    cfg: &VitConfig,
    teacher: &VitParams<Vec<f32>>,
    ranks: &Ranks,
    init: FactorInit,
    moments: Option<&InputMoments>,
) -> Result<(VitParams<Vec<f32>>, Vec<LayerReport>)> {
    validate_ranks(cfg, ranks)?;
    if teacher.blocks.len() != cfg.depth {
        bail!(
            "teacher has {} blocks, the config says {}",
            teacher.blocks.len(),
            cfg.depth
        );
    }
    let mut student = teacher.clone();
    let mut reports = Vec::new();
    for (l, (block, br)) in student.blocks.iter_mut().zip(ranks).enumerate() {
        for lin in BlockLinear::ALL {
            let Some(r) = br[lin] else { continue };
            let name = format!("blocks.{l}.{}", lin.name());
            let (out, inp) = lin.shape(cfg);
            let layer = block.linear_mut(lin);
            let Linear::Dense { weight, bias } = layer else {
                bail!("layer {name} of the teacher is already low-rank; factorize a dense teacher");
            };
            let bias_params = bias.as_ref().map_or(0, |b| b.len());
            let ((u, v, rel_error), errors) = match init {
                FactorInit::Svd => (
                    svd_factors(weight, out, inp, r, &name)
                        .with_context(|| format!("factorizing {name}"))?,
                    None,
                ),
                FactorInit::SvdAct { .. } => {
                    let c = moments.and_then(|m| m.of(l, lin)).with_context(|| {
                        format!("factorizing {name} with svd-act: no calibration of its inputs")
                    })?;
                    let factors = act::svd_act_factors(weight, out, inp, r, c, &name)
                        .with_context(|| format!("factorizing {name}"))?;
                    let (su, sv, _) = svd_factors(weight, out, inp, r, &name)?;
                    let errors = (
                        act::output_error(weight, &factors.0, &factors.1, c, out, inp, r),
                        act::output_error(weight, &su, &sv, c, out, inp, r),
                    );
                    (factors, Some(errors))
                }
                // The key's third part is the layer's position in the block.
                FactorInit::Random { seed } => (
                    random_factors(
                        weight,
                        out,
                        inp,
                        r,
                        &mut Rng::from_keys(&[seed, l as u64, lin as u64]),
                    ),
                    None,
                ),
            };
            let (output_error, svd_output_error) = (errors.map(|e| e.0), errors.map(|e| e.1));
            reports.push(LayerReport {
                name,
                out,
                inp,
                rank: r,
                params_before: out * inp + bias_params,
                params_after: r * (out + inp) + bias_params,
                rel_error,
                output_error,
                svd_output_error,
            });
            *layer = Linear::LowRank {
                u,
                v,
                bias: std::mem::take(bias),
            };
        }
    }
    debug_assert!(is_lowrank(ranks) || reports.is_empty());
    Ok((student, reports))
}

/// The student of `teacher` at `ranks` that `plan` describes: factorized
/// (calibrating on `data` first for `svd-act`), then, for
/// `FromTeacher::Embeddings`, every block's tensors but its factors and
/// the head replaced by fresh ones (`init_params` drawn from `seed`).
pub fn make_student(
    cfg: &VitConfig,
    teacher: &VitParams<Vec<f32>>,
    ranks: &Ranks,
    plan: &StudentPlan,
    seed: u64,
    data: Option<CalibrationData<'_>>,
) -> Result<(VitParams<Vec<f32>>, Vec<LayerReport>)> {
    let moments = match (plan.init, data) {
        (FactorInit::SvdAct { calibration }, Some(d)) => Some(calibrate(
            cfg,
            teacher,
            ranks,
            d.train,
            d.transform,
            calibration,
        )?),
        (FactorInit::SvdAct { .. }, None) => {
            bail!("--init svd-act needs training images to calibrate on (give --data)")
        }
        _ => None,
    };
    let (mut student, reports) = factorize(cfg, teacher, ranks, plan.init, moments.as_ref())?;
    if plan.from_teacher == FromTeacher::Embeddings {
        refresh_blocks_and_head(cfg, ranks, &mut student, seed);
    }
    Ok((student, reports))
}

/// Fresh blocks (but their factors) and a fresh head, as a model trained
/// from scratch starts (`init_params`): LayerNorms 1 and 0, biases 0,
/// dense weights and the head truncated-normal.
fn refresh_blocks_and_head(
    cfg: &VitConfig,
    ranks: &Ranks,
    student: &mut VitParams<Vec<f32>>,
    seed: u64,
) {
    let fresh = init_params(cfg, ranks, seed);
    for (block, mut new) in student.blocks.iter_mut().zip(fresh.blocks) {
        for lin in BlockLinear::ALL {
            if let (Linear::LowRank { u, v, .. }, Linear::LowRank { u: nu, v: nv, .. }) =
                (block.linear_mut(lin), new.linear_mut(lin))
            {
                std::mem::swap(u, nu);
                std::mem::swap(v, nv);
            }
        }
        *block = new;
    }
    student.head = fresh.head;
    student.head_dist = fresh.head_dist;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{param_count, uniform_ranks};

    fn random_matrix(out: usize, inp: usize, seed: u64) -> Vec<f32> {
        Rng::new(seed).normal_vec(out * inp, 1.0)
    }

    #[test]
    fn full_rank_svd_factors_reproduce_the_matrix() {
        let (out, inp) = (24, 40);
        let w = random_matrix(out, inp, 1);
        let (u, v, err) = svd_factors(&w, out, inp, out, "w").unwrap();
        assert!(err < 1e-6, "spectral error {err}");
        let direct = relative_error(&w, &u, &v, out, inp, out);
        assert!(direct < 1e-5, "reconstruction error {direct}");
    }

    #[test]
    fn truncated_error_matches_direct_computation() {
        let (out, inp) = (30, 20);
        let w = random_matrix(out, inp, 2);
        for r in [1, 5, 19] {
            let (u, v, err) = svd_factors(&w, out, inp, r, "w").unwrap();
            let direct = relative_error(&w, &u, &v, out, inp, r);
            assert!(
                (err - direct).abs() < 1e-4 * direct.max(1e-3),
                "r={r}: {err} vs {direct}"
            );
        }
    }

    #[test]
    fn factors_split_singular_values_evenly() {
        // W = diag(9, 4) embedded in 2x3: U = U_r S^½ has column norms 3, 2.
        let w = vec![9.0, 0.0, 0.0, 0.0, 4.0, 0.0];
        let (u, v, _) = svd_factors(&w, 2, 3, 2, "w").unwrap();
        let col_norm = |k: usize| (u[k].powi(2) + u[2 + k].powi(2)).sqrt();
        let row_norm = |k: usize| (0..3).map(|j| v[k * 3 + j].powi(2)).sum::<f32>().sqrt();
        assert!((col_norm(0) - 3.0).abs() < 1e-5 && (col_norm(1) - 2.0).abs() < 1e-5);
        assert!((row_norm(0) - 3.0).abs() < 1e-5 && (row_norm(1) - 2.0).abs() < 1e-5);
    }

    /// The bits of `v`, so that a comparison tells -0 from 0 and NaNs apart.
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// A sweep factorizes each student on its worker's pool (two threads
    /// with `--parallel 1`, one with two workers), so the factors may not
    /// depend on the thread count; at the width of the model's MLP layers
    /// (128 x 256) the SVD's blocked paths run in parallel when let.
    #[test]
    fn svd_factors_are_the_same_bits_on_any_thread_count() {
        for (out, inp) in [(256, 128), (128, 256)] {
            let w = random_matrix(out, inp, 11);
            crate::testing::same_on_any_thread_count("svd_factors", || {
                let (u, v, err) = svd_factors(&w, out, inp, 4, "w").unwrap();
                (bits(&u), bits(&v), err.to_bits())
            });
        }
    }

    #[test]
    fn bad_ranks_and_values_are_errors_naming_the_layer() {
        let w = random_matrix(4, 6, 3);
        let e = svd_factors(&w, 4, 6, 5, "blocks.0.attn.q")
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.0.attn.q") && e.contains("[4, 6]"), "{e}");
        assert!(svd_factors(&w, 4, 6, 0, "x").is_err());
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        assert!(svd_factors(&bad, 4, 6, 2, "x")
            .unwrap_err()
            .to_string()
            .contains("not finite"));
    }

    #[test]
    fn random_factors_have_dense_init_spread() {
        let (out, inp, r) = (64, 64, 16);
        let (u, v, _) = random_factors(&vec![0.0; out * inp], out, inp, r, &mut Rng::new(5));
        let mut uv = vec![0f32; out * inp];
        crate::ops::matmul::cpu::matmul(&mut uv, &u, &v, Gemm::new(out, inp, r));
        let std = (uv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / uv.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.003, "std {std}");
    }

    #[test]
    fn factorized_model_has_the_expected_parameter_count() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let dense = crate::model::params::dense_ranks(&cfg);
        let mut rng = Rng::new(9);
        let teacher: VitParams<Vec<f32>> = VitParams::build(&cfg, &dense, |s| {
            Ok::<_, ()>(rng.normal_vec(s.numel(), 0.02))
        })
        .unwrap();
        let ranks = uniform_ranks(&cfg, 8);
        let (student, reports) = factorize(&cfg, &teacher, &ranks, FactorInit::Svd, None).unwrap();
        assert_eq!(reports.len(), 6 * cfg.depth);
        let count: usize = student.tensors().iter().map(|t| t.len()).sum();
        assert_eq!(count, param_count(&cfg, &ranks));
        assert_eq!(student.head.bias(), teacher.head.bias());
    }

    fn random_teacher(cfg: &VitConfig) -> VitParams<Vec<f32>> {
        let mut rng = Rng::new(9);
        VitParams::build(cfg, &crate::model::params::dense_ranks(cfg), |s| {
            Ok::<_, ()>(rng.normal_vec(s.numel(), 0.02))
        })
        .unwrap()
    }

    /// The reference protocol's student: only the patch embedding, class
    /// token, position embedding and final LayerNorm are the teacher's.
    #[test]
    fn an_embeddings_only_student_has_fresh_blocks_and_head() {
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let teacher = random_teacher(&cfg);
        let ranks = uniform_ranks(&cfg, 4);
        let plan = StudentPlan {
            init: FactorInit::Random { seed: 42 },
            from_teacher: FromTeacher::Embeddings,
            ..StudentPlan::default()
        };
        let (s, _) = make_student(&cfg, &teacher, &ranks, &plan, 42, None).unwrap();
        for (name, a, b) in [
            ("patch_w", &s.patch_w, &teacher.patch_w),
            (
                "patch_b",
                s.patch_b.as_ref().unwrap(),
                teacher.patch_b.as_ref().unwrap(),
            ),
            (
                "cls",
                s.cls.as_ref().unwrap(),
                teacher.cls.as_ref().unwrap(),
            ),
            ("pos", &s.pos, &teacher.pos),
            ("norm_w", &s.norm_w, &teacher.norm_w),
            ("norm_b", &s.norm_b, &teacher.norm_b),
        ] {
            assert_eq!(a, b, "{name} comes from the teacher");
        }
        let b = &s.blocks[1];
        assert!(
            b.norm1_w.iter().chain(&b.norm2_w).all(|&v| v == 1.0)
                && b.norm1_b.iter().chain(&b.norm2_b).all(|&v| v == 0.0),
            "fresh LayerNorms"
        );
        assert!(
            BlockLinear::ALL.iter().all(|&l| b
                .linear(l)
                .bias()
                .into_iter()
                .flatten()
                .all(|&v| v == 0.0)),
            "fresh biases"
        );
        assert!(s.head.bias().into_iter().flatten().all(|&v| v == 0.0));
        let (Linear::Dense { weight: head, .. }, Linear::Dense { weight: old, .. }) =
            (&s.head, &teacher.head)
        else {
            panic!("dense heads")
        };
        assert_ne!(head, old, "a new head");
        // The factors are the factor initialization's, not init_params'.
        let (plain, _) = factorize(&cfg, &teacher, &ranks, plan.init, None).unwrap();
        let (Linear::LowRank { u, .. }, Linear::LowRank { u: want, .. }) =
            (&b.fc1, &plain.blocks[1].fc1)
        else {
            panic!("low-rank fc1")
        };
        assert_eq!(u, want);
        // The default keeps everything that is not factorized.
        let (kept, _) = make_student(
            &cfg,
            &teacher,
            &ranks,
            &StudentPlan {
                init: plan.init,
                ..StudentPlan::default()
            },
            42,
            None,
        )
        .unwrap();
        assert_eq!(kept.blocks[1].norm1_w, teacher.blocks[1].norm1_w);
        assert_eq!(kept.head.bias(), teacher.head.bias());
    }

    #[test]
    fn svd_act_parses_records_its_calibration_and_needs_data() {
        assert_eq!(
            "svd-act".parse::<FactorInit>().unwrap(),
            FactorInit::SvdAct {
                calibration: DEFAULT_CALIBRATION
            }
        );
        assert!("svdact"
            .parse::<FactorInit>()
            .unwrap_err()
            .to_string()
            .contains("svd, svd-act or random"));
        assert_eq!(
            serde_json::to_string(&FactorInit::SvdAct { calibration: 8 }).unwrap(),
            r#"{"svd-act":{"calibration":8}}"#
        );
        assert_eq!(serde_json::to_string(&FactorInit::Svd).unwrap(), r#""svd""#);
        assert_eq!(
            FactorInit::Random { seed: 1 }.with_seed(5),
            FactorInit::Random { seed: 5 }
        );
        assert_eq!(FactorInit::Svd.with_seed(5), FactorInit::Svd);
        let cfg = VitConfig::preset("vit-demo", 10).unwrap();
        let plan = StudentPlan {
            init: FactorInit::SvdAct { calibration: 8 },
            ..StudentPlan::default()
        };
        let e = make_student(
            &cfg,
            &random_teacher(&cfg),
            &uniform_ranks(&cfg, 2),
            &plan,
            0,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("svd-act") && e.contains("--data"), "{e}");
    }
}
