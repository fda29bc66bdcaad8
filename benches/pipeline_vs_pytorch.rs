//! The whole pipeline, the engine against PyTorch + timm, paired round by round.
//!
//!     pip install --target /tmp/torchdeps torch timm scipy
//!     PYTHONPATH=/tmp/torchdeps cargo bench --bench pipeline_vs_pytorch
//!
//! For each setting, a round runs the engine's pipeline as a user would run
//! it (`train` a teacher from scratch, `sweep` the ranks with SVD-initialized
//! students distilled by KD, `analyze`), each command timed, and the same
//! work written by hand in PyTorch + timm (`scripts/pipeline_pytorch.py`: the
//! same model, data, epochs, batch, optimizer, schedule, augmentation, KD
//! loss, SVD initialization, per-epoch evaluation), one after the other, the
//! order swapping every round. Both read the same images: the bench exports
//! the engine's demo data as raw bytes for the script. Prints, per setting,
//! each stage's wall time on both sides (median over rounds), the ratio of
//! each stage and of the total per round (median, and the range), and both
//! sides' accuracies.
//!
//! Settings: the built-in demo (`sweep --demo`'s: vit-demo, 4000 images at
//! 16 px, teacher 12 epochs, 7 ranks x 6 epochs) and a 32 px / patch 4 /
//! width 64 / depth 4 ViT (1500 images upsampled from 16 px; teacher 30
//! epochs, 9 ranks x 10 epochs, as the issue that asked for this bench
//! measured). Environment: `EFFRANK_PIPELINE_ROUNDS` (default 2),
//! `EFFRANK_PIPELINE_EPOCH_SCALE` (multiplies every epoch count; default 1),
//! `EFFRANK_PIPELINE_SETTINGS` (comma-separated names to run: demo, small32),
//! `EFFRANK_PIPELINE_SEED` (both sides' seed of initialization, batch order
//! and augmentation, teacher and students; default 0; the data stay the
//! same), `EFFRANK_PIPELINE_SEEDS` (a comma-separated list of such seeds,
//! run one after the other, each for the rounds asked, then the accuracies
//! per seed and their means over the seeds side by side),
//! `EFFRANK_PIPELINE_STAGES=teacher` (the teacher alone on both sides: no
//! students, no analysis; for accuracy over many seeds at a fifth of the
//! time),
//! `PYTHON`, and `RAYON_NUM_THREADS` (the thread count of both sides). Where
//! PyTorch cannot be started the bench says why and skips itself.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");

struct Setting {
    name: &'static str,
    /// Model config (JSON, the engine's `VitConfig`).
    model: &'static str,
    heads: usize,
    width: usize,
    depth: usize,
    mlp: usize,
    image_size: usize,
    demo_images: usize,
    teacher_epochs: usize,
    student_epochs: usize,
    ranks: &'static [usize],
    batch: usize,
    lr: f32,
    teacher_wd: f32,
}

const SETTINGS: [Setting; 2] = [
    Setting {
        name: "demo",
        model: "vit-demo",
        heads: 2,
        width: 64,
        depth: 2,
        mlp: 128,
        image_size: 16,
        demo_images: 4000,
        teacher_epochs: 12,
        student_epochs: 6,
        ranks: &[1, 2, 4, 8, 16, 32, 64],
        batch: 64,
        lr: 2e-3,
        teacher_wd: 0.05,
    },
    Setting {
        name: "small32",
        model: "small32",
        heads: 4,
        width: 64,
        depth: 4,
        mlp: 256,
        image_size: 32,
        demo_images: 1500,
        teacher_epochs: 30,
        student_epochs: 10,
        ranks: &[1, 2, 4, 8, 12, 16, 24, 32, 64],
        batch: 64,
        lr: 1e-3,
        teacher_wd: 0.01,
    },
];

/// Seconds per stage of one pipeline run, and its accuracies.
struct Run {
    teacher: f64,
    students: f64,
    analysis: f64,
    teacher_top1: f64,
    student_top1: Vec<f64>,
}

/// A stage's name and its seconds in a run.
type Stage = (&'static str, fn(&Run) -> f64);

impl Run {
    fn total(&self) -> f64 {
        self.teacher + self.students + self.analysis
    }
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// The seeds both sides train with, one after the other:
/// `EFFRANK_PIPELINE_SEEDS` (a list), else `EFFRANK_PIPELINE_SEED`, else 0.
fn seeds() -> Vec<usize> {
    match std::env::var("EFFRANK_PIPELINE_SEEDS") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim().parse().unwrap_or_else(|_| {
                    panic!("EFFRANK_PIPELINE_SEEDS={list:?}: not a comma-separated list of seeds")
                })
            })
            .collect(),
        Err(_) => vec![env_usize("EFFRANK_PIPELINE_SEED", 0)],
    }
}

/// `EFFRANK_PIPELINE_STAGES=teacher`: the teacher alone on both sides.
fn teacher_only() -> bool {
    match std::env::var("EFFRANK_PIPELINE_STAGES").as_deref() {
        Err(_) | Ok("all") => false,
        Ok("teacher") => true,
        Ok(other) => {
            panic!("EFFRANK_PIPELINE_STAGES={other:?}: use teacher (the teacher alone) or all")
        }
    }
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The model config file of a setting (the demo uses the preset).
fn model_arg(s: &Setting, dir: &Path) -> String {
    if s.model == "vit-demo" {
        return s.model.into();
    }
    let path = dir.join(format!("{}.json", s.name));
    let cfg = serde_json::json!({"image_size": s.image_size, "channels": 3, "patch": 4, "width": s.width, "depth": s.depth, "heads": s.heads, "mlp": s.mlp, "classes": 10, "ln_eps": 1e-6});
    std::fs::write(&path, cfg.to_string()).unwrap();
    path.display().to_string()
}

/// The demo data the engine's `--data demo --demo-images n` generates, as
/// raw bytes for the PyTorch script.
fn export_demo(n: usize, dir: &Path) {
    let cfg = effrank_engine::data::DemoConfig {
        train: n,
        test: (n / 4).max(1),
        ..Default::default()
    };
    let (train, test) = effrank_engine::data::demo::generate(&cfg).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (name, ds) in [("train", &train), ("test", &test)] {
        std::fs::write(dir.join(format!("{name}_images.u8")), &ds.images).unwrap();
        std::fs::write(
            dir.join(format!("{name}_labels.u8")),
            ds.labels.iter().map(|&l| l as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
    }
    let meta = serde_json::json!({"train_n": train.len(), "test_n": test.len(), "channels": train.channels, "side": train.height, "classes": train.classes});
    std::fs::write(dir.join("data.json"), meta.to_string()).unwrap();
}

fn timed(cmd: &mut Command, what: &str) -> (f64, String) {
    let t = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let secs = t.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    (secs, text)
}

fn engine(s: &Setting, dir: &Path, scale: usize, seed: usize) -> Run {
    let run = tempfile::tempdir_in(dir).unwrap();
    let teacher = run.path().join("teacher");
    let (te, se) = (
        (s.teacher_epochs * scale).to_string(),
        (s.student_epochs * scale).to_string(),
    );
    let (batch, lr, wd, n) = (
        s.batch.to_string(),
        s.lr.to_string(),
        s.teacher_wd.to_string(),
        s.demo_images.to_string(),
    );
    let model = model_arg(s, dir);
    let data = [
        "--data",
        "demo",
        "--demo-images",
        &n,
        "--device",
        "cpu",
        "--quiet",
    ];
    let common = ["--batch", &batch, "--lr", &lr];
    let seed = seed.to_string();
    let (t_teacher, _) = timed(
        Command::new(BIN)
            .args([
                "train",
                "--model",
                &model,
                "--epochs",
                &te,
                "--wd",
                &wd,
                "--seed",
                &seed,
                "--out",
                teacher.to_str().unwrap(),
            ])
            .args(common)
            .args(data),
        "engine train",
    );
    let sweep = run.path().join("sweep");
    if teacher_only() {
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(teacher.join("summary.json")).unwrap())
                .unwrap();
        return Run {
            teacher: t_teacher,
            students: 0.0,
            analysis: 0.0,
            teacher_top1: summary["test_top1"].as_f64().unwrap(),
            student_top1: Vec::new(),
        };
    }
    let ranks = s
        .ranks
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let ckpt = teacher.join("model.safetensors");
    let (t_students, _) = timed(
        Command::new(BIN)
            .args([
                "sweep",
                "--teacher",
                ckpt.to_str().unwrap(),
                "--ranks",
                &ranks,
                "--epochs",
                &se,
                "--seeds",
                &seed,
                "--no-analyze",
                "--out",
                sweep.to_str().unwrap(),
            ])
            .args(common)
            .args(data),
        "engine sweep",
    );
    let (t_analysis, _) = timed(
        Command::new(BIN).args(["analyze", "--results", sweep.to_str().unwrap()]),
        "engine analyze",
    );
    let (mut teacher_top1, mut student_top1) = (0.0, Vec::new());
    for line in std::fs::read_to_string(sweep.join("results.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["kind"].as_str() {
            Some("teacher") => teacher_top1 = v["top1"].as_f64().unwrap(),
            _ => student_top1.push(v["top1"].as_f64().unwrap()),
        }
    }
    Run {
        teacher: t_teacher,
        students: t_students,
        analysis: t_analysis,
        teacher_top1,
        student_top1,
    }
}

fn pytorch(s: &Setting, dir: &Path, data: &Path, scale: usize, seed: usize) -> Result<Run, String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let spec = serde_json::json!({
        "model": {"image_size": s.image_size, "patch": 4, "width": s.width, "depth": s.depth, "heads": s.heads, "mlp": s.mlp, "classes": 10},
        "teacher_epochs": s.teacher_epochs * scale, "student_epochs": s.student_epochs * scale, "ranks": if teacher_only() { &[][..] } else { s.ranks },
        "batch": s.batch, "lr": s.lr, "min_lr": 1e-5, "warmup_epochs": 1.0, "weight_decay": 0.01, "teacher_weight_decay": s.teacher_wd,
        "clip": 1.0, "crop_padding": 2, "flip": true, "alpha": 0.5, "temperature": 4.0,
        "normalize_mean": [0.5, 0.5, 0.5], "normalize_std": [0.5, 0.5, 0.5], "threads": threads(), "seed": seed,
    });
    let spec_path = dir.join(format!("{}-spec.json", s.name));
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pipeline_pytorch.py");
    let out = Command::new(&python)
        .args([
            script,
            "--data",
            data.to_str().unwrap(),
            "--spec",
            spec_path.to_str().unwrap(),
        ])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("{script} printed {line:?}: {e}"))?;
    let secs = |k: &str| v["seconds"][k].as_f64().unwrap();
    let student_top1 = v["result"]["students_top1"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_f64().unwrap())
        .collect();
    Ok(Run {
        teacher: secs("teacher"),
        students: secs("students"),
        analysis: secs("analysis"),
        teacher_top1: v["result"]["teacher_top1"].as_f64().unwrap(),
        student_top1,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn range(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = env_usize("EFFRANK_PIPELINE_ROUNDS", 2);
    let scale = env_usize("EFFRANK_PIPELINE_EPOCH_SCALE", 1);
    let wanted =
        std::env::var("EFFRANK_PIPELINE_SETTINGS").unwrap_or_else(|_| "demo,small32".into());
    let (seeds, teacher_only) = (seeds(), teacher_only());
    let work = tempfile::tempdir().unwrap();
    let seed_list = seeds
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let what = if teacher_only {
        "the teacher alone"
    } else {
        "whole pipeline"
    };
    let seed_word = if seeds.len() == 1 { "seed" } else { "seeds" };
    println!("{what}, engine vs PyTorch + timm, CPU, {} threads, alternating rounds per seed: {rounds}, {seed_word} {seed_list}", threads());
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for s in SETTINGS
        .iter()
        .filter(|s| wanted.split(',').any(|w| w.trim() == s.name))
    {
        let data = work.path().join(format!("{}-data", s.name));
        export_demo(s.demo_images, &data);
        let (mut eng, mut py) = (Vec::new(), Vec::new());
        // Per seed: the last round's run on each side (a seed's accuracies
        // repeat from round to round).
        let mut per_seed = Vec::new();
        for &seed in &seeds {
            for round in 0..rounds {
                let first_engine = round % 2 == 0;
                let mut side = |engine_turn: bool| -> Result<(), String> {
                    if engine_turn {
                        eng.push(engine(s, work.path(), scale, seed));
                    } else {
                        py.push(pytorch(s, work.path(), &data, scale, seed)?);
                    }
                    Ok(())
                };
                let result = side(first_engine).and_then(|_| side(!first_engine));
                if let Err(e) = result {
                    println!("PyTorch could not run ({e}); skipping (pip install --target /tmp/torchdeps torch timm scipy, then PYTHONPATH=/tmp/torchdeps)");
                    return;
                }
                let (e, p) = (eng.last().unwrap(), py.last().unwrap());
                if teacher_only {
                    println!("  {} seed {seed} round {}: teacher, engine {:.1} s, PyTorch {:.1} s: {:.2}x", s.name, round + 1, e.teacher, p.teacher, p.teacher / e.teacher);
                } else {
                    println!("  {} seed {seed} round {}: engine {:.1} s (teacher {:.1}, students {:.1}), PyTorch {:.1} s (teacher {:.1}, students {:.1}): {:.2}x", s.name, round + 1, e.total(), e.teacher, e.students, p.total(), p.teacher, p.students, p.total() / e.total());
                }
            }
            let (e, p) = (eng.last().unwrap(), py.last().unwrap());
            per_seed.push((
                seed,
                e.teacher_top1,
                p.teacher_top1,
                mean(&e.student_top1),
                mean(&p.student_top1),
            ));
        }
        let stage_note = if teacher_only {
            format!("teacher {} epochs only", s.teacher_epochs * scale)
        } else {
            format!(
                "teacher {} epochs, {} ranks x {} epochs",
                s.teacher_epochs * scale,
                s.ranks.len(),
                s.student_epochs * scale
            )
        };
        println!(
            "\n{} ({} images, {} px, width {}, depth {}; {stage_note})",
            s.name, s.demo_images, s.image_size, s.width, s.depth
        );
        println!(
            "{:<10} {:>10} {:>10} {:>8} {:>14}",
            "stage", "engine s", "PyTorch s", "ratio", "ratio range"
        );
        let stages: [Stage; 4] = [
            ("teacher", |r| r.teacher),
            ("students", |r| r.students),
            ("analysis", |r| r.analysis),
            ("total", |r| r.total()),
        ];
        for (name, get) in stages {
            if teacher_only && name != "teacher" {
                continue;
            }
            let ratios: Vec<f64> = eng.iter().zip(&py).map(|(e, p)| get(p) / get(e)).collect();
            let (lo, hi) = range(&ratios);
            println!(
                "{:<10} {:>10.2} {:>10.2} {:>7.2}x {:>6.2}-{:.2}x",
                name,
                median(eng.iter().map(get).collect()),
                median(py.iter().map(get).collect()),
                median(ratios.clone()),
                lo,
                hi
            );
        }
        let pct = |v: f64| format!("{:.2}%", 100.0 * v);
        println!(
            "accuracy (top-1 on the {} test images){}",
            s.demo_images / 4,
            if teacher_only {
                ""
            } else {
                "; students: mean over ranks"
            }
        );
        println!(
            "{:<8} {:>16} {:>16} {:>8} {:>16} {:>16} {:>8}",
            "seed",
            "teacher engine",
            "teacher PyTorch",
            "apart",
            "students engine",
            "students PyTorch",
            "apart"
        );
        let row = |label: &str, (te, tp, se, sp): (f64, f64, f64, f64)| {
            let students = if teacher_only {
                ["-".to_string(), "-".to_string(), "-".to_string()]
            } else {
                [pct(se), pct(sp), format!("{:+.2}", 100.0 * (se - sp))]
            };
            println!(
                "{:<8} {:>16} {:>16} {:>8} {:>16} {:>16} {:>8}",
                label,
                pct(te),
                pct(tp),
                format!("{:+.2}", 100.0 * (te - tp)),
                students[0],
                students[1],
                students[2]
            );
        };
        for &(seed, te, tp, se, sp) in &per_seed {
            row(&seed.to_string(), (te, tp, se, sp));
        }
        if per_seed.len() > 1 {
            let col = |f: fn(&(usize, f64, f64, f64, f64)) -> f64| {
                mean(&per_seed.iter().map(f).collect::<Vec<_>>())
            };
            row(
                "mean",
                (col(|r| r.1), col(|r| r.2), col(|r| r.3), col(|r| r.4)),
            );
        }
    }
}
