//! Every checkpoint the engine writes evaluates as its run evaluated it.
//!
//! The data is the demo set, whose default normalization is `half`; every
//! run here uses `--normalize imagenet` instead, so a checkpoint that did
//! not record its normalization (the bug this guards against) would
//! evaluate with the wrong one and miss its recorded accuracy. For each
//! command that writes a checkpoint (train, distill, sweep and its adaptive
//! students, factorize), `eval` with no data flags must reproduce the run's
//! recorded top-1 bit for bit (same data, same device).

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");
const DATA: [&str; 6] = [
    "--data",
    "demo",
    "--demo-images",
    "600",
    "--normalize",
    "imagenet",
];

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

/// A teacher trained with --normalize imagenet (once per test process).
fn teacher() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("teacher");
        let mut args = vec![
            "train",
            "--model",
            "vit-demo",
            "--epochs",
            "3",
            "--lr",
            "2e-3",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(DATA);
        ok(&args);
        (dir, out.join("model.safetensors"))
    });
    path
}

/// `eval --json` of a checkpoint, with `extra` flags only.
fn eval(checkpoint: &Path, extra: &[&str]) -> (Value, String) {
    let mut args = vec![
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
        "--quiet",
    ];
    args.extend(extra);
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "eval {checkpoint:?} failed:\n{stderr}"
    );
    (
        serde_json::from_slice(&out.stdout).expect("eval --json prints one JSON object"),
        stderr,
    )
}

/// eval with no data flags reproduces the recorded top-1 exactly.
fn assert_reproduces(checkpoint: &Path) {
    let (v, stderr) = eval(checkpoint, &[]);
    let recorded = v["recorded_top1"]
        .as_f64()
        .unwrap_or_else(|| panic!("{checkpoint:?} records no accuracy: {v}"));
    assert_eq!(
        v["top1"].as_f64().unwrap().to_bits(),
        recorded.to_bits(),
        "{checkpoint:?}: eval {v} vs recorded {recorded}"
    );
    assert_eq!(v["normalize"], "imagenet", "{checkpoint:?}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn a_trained_teacher_evaluates_as_it_was_trained() {
    assert_reproduces(teacher());
}

#[test]
fn a_distilled_student_evaluates_as_it_was_trained() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "distill",
        "--teacher",
        teacher().to_str().unwrap(),
        "--rank",
        "4",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
    ];
    args.extend(DATA);
    ok(&args);
    assert_reproduces(&dir.path().join("model.safetensors"));
}

#[test]
fn sweep_and_adaptive_students_evaluate_as_they_were_trained() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let mut args = vec![
        "sweep",
        "--teacher",
        teacher().to_str().unwrap(),
        "--ranks",
        "1,64",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--adaptive",
        "--adaptive-budget",
        "1",
        "--out",
        out,
    ];
    // The sweep takes the data and its normalization from the teacher.
    args.extend(["--demo-images", "600"]);
    ok(&args);
    let mut ranks = Vec::new();
    for line in std::fs::read_to_string(dir.path().join("results.jsonl"))
        .unwrap()
        .lines()
    {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["kind"] == "student" {
            let rank = v["rank"].as_u64().unwrap();
            let ck = dir
                .path()
                .join(format!("runs/r{rank}-s0/model.safetensors"));
            assert_reproduces(&ck);
            let (e, _) = eval(&ck, &[]);
            assert_eq!(
                e["top1"].as_f64().unwrap().to_bits(),
                v["top1"].as_f64().unwrap().to_bits(),
                "rank {rank}: eval against the results record"
            );
            ranks.push(rank);
        }
    }
    assert_eq!(
        ranks.len(),
        3,
        "two ranks and one added by --adaptive: {ranks:?}"
    );
}

#[test]
fn a_factorized_student_records_its_teacher_and_normalization() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s.safetensors");
    ok(&[
        "factorize",
        "--teacher",
        teacher().to_str().unwrap(),
        "--rank",
        "8",
        "--out",
        s.to_str().unwrap(),
    ]);
    let (plain, _) = eval(&s, &[]);
    let (explicit, _) = eval(
        &s,
        &[
            "--data",
            "demo",
            "--demo-images",
            "600",
            "--normalize",
            "imagenet",
        ],
    );
    assert_eq!(plain["top1"], explicit["top1"]);
    assert_eq!(plain["normalize"], "imagenet");
    let meta = effrank_engine::model::checkpoint::read_metadata(&s).unwrap();
    let run: Value = serde_json::from_str(&meta["run"]).unwrap();
    assert_eq!(run["role"], "student");
    assert_eq!(
        run["teacher"]["sha256"].as_str().unwrap(),
        effrank_engine::provenance::FileRef::of(teacher())
            .unwrap()
            .sha256
    );
    assert_eq!(run["factor_init"], "svd");
}

#[test]
fn eval_on_other_data_than_recorded_warns() {
    let (_, stderr) = eval(teacher(), &["--demo-images", "400"]);
    assert!(
        stderr.contains("warning") && stderr.contains("other data"),
        "{stderr}"
    );
}

/// A student of some layers of some blocks, svd-act-initialized, on
/// resized and center-cropped inputs: its checkpoint records all of it and
/// evaluates as it was trained.
#[test]
fn a_partial_svd_act_student_on_cropped_inputs_records_it_and_evaluates_as_trained() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "distill",
        "--teacher",
        teacher().to_str().unwrap(),
        "--rank",
        "4",
        "--layers",
        "attn",
        "--blocks",
        "1",
        "--init",
        "svd-act",
        "--calibration",
        "32",
        "--resize",
        "20",
    ];
    args.extend([
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    args.extend(DATA);
    ok(&args);
    let ck = dir.path().join("model.safetensors");
    assert_reproduces(&ck);
    let meta = effrank_engine::model::checkpoint::read_metadata(&ck).unwrap();
    let run: Value = serde_json::from_str(&meta["run"]).unwrap();
    assert_eq!(run["resize"], 20);
    assert_eq!(
        run["targets"],
        serde_json::json!({"layers": "attn", "blocks": "1"})
    );
    assert_eq!(
        run["factor_init"],
        serde_json::json!({"svd-act": {"calibration": 32}})
    );
    assert_eq!(run["from_teacher"], "all");
    // Evaluated without the crop it was trained with, it scores otherwise.
    let (uncropped, _) = eval(&ck, &["--resize", "16"]);
    let (cropped, _) = eval(&ck, &[]);
    assert_ne!(uncropped["top1"], cropped["top1"]);
}
