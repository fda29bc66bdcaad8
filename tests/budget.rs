//! End to end: the per-layer sensitivity pass on a micro teacher, and
//! `factorize --budget` from its curves (and from hand-made uniform ones),
//! its student read back by `eval` and trained by `distill`; a budget
//! sweep (`sweep --budgets`) killed and resumed.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");
/// Small demo data: 800 training and 200 test images.
const DEMO: [&str; 4] = ["--data", "demo", "--demo-images", "800"];

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "effrank-engine {args:?} failed:\n{text}"
    );
    text
}

fn fails(args: &[&str]) -> String {
    let out = run(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "{args:?} should have failed:\n{text}"
    );
    assert!(!text.contains("panicked"), "a panic:\n{text}");
    text
}

/// A micro teacher shared by the tests.
fn teacher() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("teacher");
        let mut args = vec![
            "train", "--model", "vit-demo", "--epochs", "2", "--lr", "2e-3", "--device", "cpu",
            "--quiet", "--out",
        ];
        args.push(out.to_str().unwrap());
        args.extend(DEMO);
        ok(&args);
        (dir, out.join("model.safetensors"))
    });
    path
}

/// The student parameter count `factorize` prints ("... -> N parameters").
fn printed_params(text: &str) -> usize {
    let line = text.lines().find(|l| l.contains(" parameters, ")).unwrap();
    let after = line.split("-> ").nth(1).unwrap();
    after.split(' ').next().unwrap().parse().unwrap()
}

/// The ranks of the "per-layer ranks:" table `factorize --budget` prints.
fn printed_ranks(text: &str) -> Vec<usize> {
    text.lines()
        .skip_while(|l| !l.starts_with("per-layer ranks:"))
        .skip(2)
        .take_while(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|r| r.parse().unwrap())
                .collect::<Vec<usize>>()
        })
        .collect()
}

#[test]
fn sensitivity_writes_curves_whose_full_rank_is_the_teacher_and_a_budget_student_trains() {
    let dir = tempfile::tempdir().unwrap();
    let sens = dir.path().join("sens");
    let t = teacher().to_str().unwrap();
    let mut args = vec![
        "sensitivity",
        "--teacher",
        t,
        "--ranks",
        "1,4,16",
        "--images",
        "96",
        "--batch",
        "40",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        sens.to_str().unwrap(),
    ];
    args.extend(DEMO);
    let text = ok(&args);
    assert!(text.contains("own effective rank"), "{text}");
    for f in ["analysis.json", "summary.md", "heatmap.png"] {
        assert!(sens.join(f).exists(), "{f}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sens.join("analysis.json")).unwrap())
            .unwrap();
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 12);
    assert_eq!(report["teacher_kd"].as_f64(), Some(0.0));
    for l in layers {
        let points = l["points"].as_array().unwrap();
        let ranks: Vec<u64> = points.iter().map(|p| p["rank"].as_u64().unwrap()).collect();
        assert_eq!(ranks, vec![1, 4, 16, 64]);
        let full = points.last().unwrap();
        assert_eq!(full["kd"].as_f64(), Some(0.0));
        assert_eq!(full["top1"], report["teacher_top1"]);
        assert!(points[0]["kd"].as_f64().unwrap() > 0.0);
    }
    // A budget of 3x: the allocated student meets it, eval and distill read it.
    let student = dir.path().join("b.safetensors");
    let text = ok(&[
        "factorize",
        "--teacher",
        t,
        "--budget",
        "3x",
        "--sensitivity",
        sens.to_str().unwrap(),
        "--out",
        student.to_str().unwrap(),
    ]);
    let ranks = printed_ranks(&text);
    assert_eq!(ranks.len(), 12, "{text}");
    let dense = {
        let full = ok(&[
            "factorize",
            "--teacher",
            t,
            "--rank",
            "64",
            "--out",
            dir.path().join("f.safetensors").to_str().unwrap(),
        ]);
        let line = full.lines().find(|l| l.contains(" parameters, ")).unwrap();
        line.split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    };
    assert!(printed_params(&text) <= dense / 3, "{text}");
    let mut eval = vec![
        "eval",
        "--checkpoint",
        student.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ];
    eval.extend(DEMO);
    let said = ok(&eval);
    let line = said
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("eval --json prints JSON");
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert!(json["top1"].is_number());
    // eval reports the student's own per-layer ranks and parameter count.
    assert_eq!(
        json["parameters"].as_u64().unwrap() as usize,
        printed_params(&text)
    );
    let evaluated: Vec<Option<usize>> = json["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| {
            b.as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_u64().map(|r| r as usize))
        })
        .collect();
    assert_eq!(
        evaluated,
        ranks.iter().map(|&r| Some(r)).collect::<Vec<_>>()
    );
    let out = dir.path().join("distilled");
    let mut distill = vec![
        "distill",
        "--teacher",
        t,
        "--student",
        student.to_str().unwrap(),
        "--epochs",
        "1",
        "--lr",
        "2e-3",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    distill.extend(DEMO);
    ok(&distill);
    let text = ok(&[
        "eval",
        "--checkpoint",
        out.join("model.safetensors").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(text.contains("top-1"), "{text}");
    assert_eq!(printed_ranks(&text), ranks, "{text}");
    // Bad budgets are errors naming the problem.
    let e = fails(&[
        "factorize",
        "--teacher",
        t,
        "--budget",
        "1000",
        "--sensitivity",
        sens.to_str().unwrap(),
    ]);
    assert!(e.contains("below the smallest student"), "{e}");
    let e = fails(&["factorize", "--teacher", t, "--budget", "3x"]);
    assert!(e.contains("--sensitivity"), "{e}");
    let e = fails(&[
        "factorize",
        "--teacher",
        t,
        "--budget",
        "half",
        "--sensitivity",
        "x",
    ]);
    assert!(e.contains("compression factor"), "{e}");
}

/// Curves that cost every layer the same loss per parameter: the budget of
/// uniform rank r gives rank r everywhere.
#[test]
fn factorize_budget_with_uniform_curves_gives_the_uniform_rank() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher().to_str().unwrap();
    let mut layers = Vec::new();
    for block in 0..2 {
        for (layer, out, inp) in [
            ("q", 64, 64),
            ("k", 64, 64),
            ("v", 64, 64),
            ("proj", 64, 64),
            ("fc1", 128, 64),
            ("fc2", 64, 128),
        ] {
            let points: Vec<serde_json::Value> = (1..=64)
                .map(|r| {
                    let kd = if r == 64 {
                        0.0
                    } else {
                        (out + inp) as f64 * 0.5f64.powi(r)
                    };
                    serde_json::json!({"rank": r, "dense": r == 64, "kd": kd, "top1": 0.5})
                })
                .collect();
            layers.push(
                serde_json::json!({"block": block, "layer": layer, "out": out,
                "inp": inp, "points": points, "rank_lo": 1, "rank_hi": 1}),
            );
        }
    }
    let report = serde_json::json!({"images": 1, "init": "svd", "temperature": 4.0, "lo": 0.85,
        "hi": 0.95, "teacher_top1": 0.5, "teacher_kd": 0.0, "grid": [1], "layers": layers,
        "passes": 1, "seconds": 0.0});
    let curves = dir.path().join("uniform.json");
    std::fs::write(&curves, report.to_string()).unwrap();
    for r in [2usize, 8] {
        let uniform = ok(&[
            "factorize",
            "--teacher",
            t,
            "--rank",
            &r.to_string(),
            "--out",
            dir.path().join("u.safetensors").to_str().unwrap(),
        ]);
        let budget = printed_params(&uniform).to_string();
        let text = ok(&[
            "factorize",
            "--teacher",
            t,
            "--budget",
            &budget,
            "--sensitivity",
            curves.to_str().unwrap(),
            "--out",
            dir.path().join("b.safetensors").to_str().unwrap(),
        ]);
        assert_eq!(printed_ranks(&text), vec![r; 12], "{text}");
        assert_eq!(printed_params(&text).to_string(), budget);
    }
}

/// A micro teacher's sensitivity curves, shared by the sweep test.
fn sensitivity(dir: &Path) -> PathBuf {
    let sens = dir.join("sens");
    let t = teacher().to_str().unwrap();
    let mut args = vec![
        "sensitivity",
        "--teacher",
        t,
        "--ranks",
        "1,2,4,16",
        "--images",
        "96",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        sens.to_str().unwrap(),
    ];
    args.extend(DEMO);
    ok(&args);
    sens
}

/// One uniform rank and two budgets, two epochs each, one student at a
/// time (so a fault's count names the same job every time).
fn budget_sweep(out: &Path, sens: &Path, fault: Option<&str>) -> Output {
    let mut c = Command::new(BIN);
    c.args([
        "sweep",
        "--teacher",
        teacher().to_str().unwrap(),
        "--ranks",
        "1,2",
        "--budgets",
        "5x,3x",
        "--sensitivity",
        sens.to_str().unwrap(),
        "--epochs",
        "2",
        "--lr",
        "2e-3",
        "--parallel",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ])
    .args(DEMO);
    match fault {
        Some(f) => c.env("EFFRANK_FAULT", f),
        None => c.env_remove("EFFRANK_FAULT"),
    };
    c.output().unwrap()
}

/// (rank, seed, budget) → (top-1 bits, top-5 bits, per-layer ranks,
/// resumed-from epoch) of every student record, and the number of records.
type Students =
    std::collections::BTreeMap<(u64, u64, Option<u64>), (u64, u64, serde_json::Value, u64)>;

fn students(out: &Path) -> (Students, usize) {
    let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let (mut map, mut n) = (Students::new(), 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] != "student" {
            continue;
        }
        n += 1;
        let budget = v["allocation"]["budget_params"].as_u64();
        map.insert(
            (
                v["rank"].as_u64().unwrap(),
                v["seed"].as_u64().unwrap(),
                budget,
            ),
            (
                v["top1"].as_f64().unwrap().to_bits(),
                v["top5"].as_f64().unwrap().to_bits(),
                v["ranks"].clone(),
                v["resumed_from_epoch"].as_u64().unwrap(),
            ),
        );
    }
    (map, n)
}

#[test]
fn a_budget_sweep_killed_twice_resumes_to_the_uninterrupted_records() {
    let dir = tempfile::tempdir().unwrap();
    let sens = sensitivity(dir.path());
    let whole = dir.path().join("whole");
    let out = budget_sweep(&whole, &sens, None);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let (reference, n) = students(&whole);
    assert_eq!(n, 4, "2 ranks and 2 budgets, one seed");
    let dense: u64 = 72010;
    for ((rank, _, budget), (_, _, ranks, resumed)) in &reference {
        assert_eq!(*resumed, 0);
        match budget {
            None => assert!(ranks.is_null(), "a uniform record has no per-layer ranks"),
            Some(b) => {
                assert_eq!(*rank, 0);
                assert!([dense / 5, dense / 3].contains(b), "budget {b}");
                let blocks = ranks.as_array().expect("a budget record's per-layer ranks");
                assert_eq!(blocks.len(), 2);
                assert!(blocks.iter().all(|b| b.as_array().unwrap().len() == 6));
            }
        }
    }
    // The records' parameter counts respect the budgets; the folders are b<params>-s<seed>.
    let records = std::fs::read_to_string(whole.join("results.jsonl")).unwrap();
    for line in records.lines().filter(|l| l.contains("\"allocation\"")) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let b = v["allocation"]["budget_params"].as_u64().unwrap();
        assert!(v["params"].as_u64().unwrap() <= b);
        assert!(whole
            .join(format!("runs/b{b}-s0/model.safetensors"))
            .exists());
    }
    // The analysis compares both kinds by parameter count.
    assert!(text.contains("allocated"), "{text}");
    for f in ["budget.json", "budget.png", "analysis.json", "plot.png"] {
        assert!(whole.join(f).exists(), "{f}");
    }
    let budget: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("budget.json")).unwrap()).unwrap();
    assert_eq!(budget["uniform"]["points"].as_array().unwrap().len(), 2);
    assert_eq!(budget["allocated"]["points"].as_array().unwrap().len(), 2);
    assert_eq!(
        budget["allocated"]["crossings"].as_array().unwrap().len(),
        2
    );

    // Killed after the records of the teacher and both uniform students,
    // then in the first budget student, after its first epoch's state.
    let killed = dir.path().join("killed");
    for fault in ["results:after@3", "state:after@1"] {
        let out = budget_sweep(&killed, &sens, Some(fault));
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{fault}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // --status names the budget jobs still to do (the killed one's claim is dead).
    let status = ok(&[
        "sweep",
        "--status",
        "--ranks",
        "1,2",
        "--budgets",
        &format!("{},{}", dense / 5, dense / 3),
        "--sensitivity",
        sens.to_str().unwrap(),
        "--out",
        killed.to_str().unwrap(),
    ]);
    assert!(
        status.contains(&format!(
            "to run only what is missing: --budgets {},{}",
            dense / 5,
            dense / 3
        )),
        "{status}"
    );
    assert!(status.contains("2 finished"), "{status}");
    let out = budget_sweep(&killed, &sens, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (resumed, n) = students(&killed);
    assert_eq!(n, 4, "no job recorded twice");
    let strip = |s: &Students| -> Vec<_> {
        s.iter()
            .map(|(k, (a, b, r, _))| (*k, *a, *b, r.clone()))
            .collect()
    };
    assert_eq!(strip(&resumed), strip(&reference));
    assert!(
        resumed
            .iter()
            .any(|((_, _, budget), v)| budget.is_some() && v.3 == 1),
        "a budget student resumed after its first epoch: {resumed:?}"
    );
    // --status lists the finished budget jobs by their budget.
    let status = ok(&[
        "sweep",
        "--status",
        "--ranks",
        "1,2",
        "--out",
        killed.to_str().unwrap(),
    ]);
    assert!(status.contains(&format!("b{}", dense / 5)), "{status}");
    assert!(status.contains("4 finished"), "{status}");
}
