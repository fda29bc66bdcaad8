//! Every choice of code path that can change a result is a flag, falls back
//! to its environment variable by one rule, is recorded in the run metadata
//! of the checkpoints a run writes, and is part of the teacher-logit cache
//! key (`options::ComputeOptions`).

use effrank_engine::model::checkpoint::read_metadata;
use effrank_engine::provenance::RunMeta;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");
/// Small demo data: 400 training and 100 test images.
const DEMO: [&str; 4] = ["--data", "demo", "--demo-images", "400"];

/// Each switch that can change a result: its flag and value, the
/// environment variable that falls back to it with its value, and the
/// recorded field of `ComputeOptions` with the value it must hold.
const SWITCHES: [(&str, &str, &str, &str, &str, &str); 6] = [
    (
        "--class-token-tail",
        "off",
        "EFFRANK_EVERY_TOKEN",
        "1",
        "class_token_tail",
        "off",
    ),
    (
        "--batch-split",
        "off",
        "EFFRANK_WHOLE_BATCHES",
        "1",
        "batch_split",
        "off",
    ),
    (
        "--short-attention",
        "on",
        "EFFRANK_CUDA_SHORT_ATTENTION",
        "1",
        "short_attention",
        "on",
    ),
    (
        "--fused-add-layernorm",
        "on",
        "EFFRANK_CUDA_FUSED_ADD_LN",
        "1",
        "fused_add_layernorm",
        "on",
    ),
    (
        "--attention-tiles",
        "off",
        "EFFRANK_ATTENTION_PRODUCTS",
        "1",
        "attention_tiles",
        "off",
    ),
    (
        "--simd",
        "baseline",
        "EFFRANK_SIMD",
        "baseline",
        "simd",
        "baseline",
    ),
];

/// The variables of `SWITCHES` and `EFFRANK_PROFILE`, removed from every
/// child so the environment the tests run in cannot change what they see.
const VARS: [&str; 8] = [
    "EFFRANK_EVERY_TOKEN",
    "EFFRANK_CUDA_CLASS_TOKEN_TAIL",
    "EFFRANK_WHOLE_BATCHES",
    "EFFRANK_CUDA_SHORT_ATTENTION",
    "EFFRANK_CUDA_FUSED_ADD_LN",
    "EFFRANK_ATTENTION_PRODUCTS",
    "EFFRANK_SIMD",
    "EFFRANK_PROFILE",
];

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    for v in VARS {
        c.env_remove(v);
    }
    c.args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

fn ok(args: &[&str], env: &[(&str, &str)]) {
    let out = run(args, env);
    assert!(
        out.status.success(),
        "effrank-engine {args:?} {env:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The run metadata's `compute` record of a checkpoint, as JSON.
fn compute_record(model: &Path) -> serde_json::Value {
    let meta = RunMeta::from_metadata(&read_metadata(model).unwrap(), model)
        .unwrap()
        .expect("the engine records a run");
    serde_json::to_value(
        meta.compute
            .expect("a trained model records what computed it"),
    )
    .unwrap()
}

/// Trains a one-epoch teacher into `out` with `extra` flags and `env`.
fn train(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut args = vec![
        "train", "--model", "vit-demo", "--epochs", "1", "--device", "cpu", "--quiet", "--out",
    ];
    args.push(out.to_str().unwrap());
    args.extend(DEMO);
    args.extend(extra);
    ok(&args, env);
    compute_record(&out.join("model.safetensors"))
}

#[test]
fn every_switch_is_a_flag_with_its_variable_as_fallback_and_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let default = train(&dir.path().join("default"), &[], &[]);
    assert_eq!(default["device"], "cpu");
    assert_eq!(default["precision"], "f32");
    assert!(
        default["engine"]
            .as_str()
            .unwrap()
            .starts_with(env!("CARGO_PKG_VERSION")),
        "{default}"
    );
    assert_eq!(default["paths"]["model"]["class_token_tail"], true);
    for (flag, value, var, var_value, field, recorded) in SWITCHES {
        let by_flag = train(&dir.path().join(field), &[flag, value], &[]);
        assert_eq!(
            by_flag["options"][field], recorded,
            "{flag} {value}: {by_flag}"
        );
        assert_ne!(by_flag, default, "{flag} {value} must be recorded");
        let by_env = train(&dir.path().join(var), &[], &[(var, var_value)]);
        assert_eq!(by_env["options"], by_flag["options"], "{var}={var_value}");
    }
    // A flag wins over its variable.
    let both = train(
        &dir.path().join("both"),
        &["--class-token-tail", "on"],
        &[("EFFRANK_EVERY_TOKEN", "1")],
    );
    assert_eq!(both["options"]["class_token_tail"], "on");
    // The CPU's tail off: the model's paths say so.
    let off = train(&dir.path().join("off"), &["--class-token-tail", "off"], &[]);
    assert_eq!(off["paths"]["model"]["class_token_tail"], false);
}

#[test]
fn a_variable_other_than_0_or_1_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (_, _, var, _, _, _) in SWITCHES {
        let out_dir = dir.path().join(var);
        let mut args = vec![
            "train", "--model", "vit-demo", "--epochs", "1", "--device", "cpu", "--out",
        ];
        args.push(out_dir.to_str().unwrap());
        args.extend(DEMO);
        let out = run(&args, &[(var, "yes")]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}=yes must fail");
        assert!(
            text.contains(&format!("{var}=yes")) && !text.contains("panicked"),
            "{text}"
        );
        assert!(
            !out_dir.join("model.safetensors").exists(),
            "{var}=yes wrote a model"
        );
    }
}

/// The teacher-logit cache files of a sweep folder.
fn cache_files(out: &Path) -> BTreeSet<String> {
    std::fs::read_dir(out.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn every_switch_changes_the_teacher_logit_cache_key() {
    let dir = tempfile::tempdir().unwrap();
    let teacher_dir = dir.path().join("teacher");
    train(&teacher_dir, &[], &[]);
    let teacher = teacher_dir.join("model.safetensors");
    let sweep = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "sweep",
            "--ranks",
            "4",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--no-analyze",
            "--teacher",
        ];
        args.push(teacher.to_str().unwrap());
        args.push("--out");
        args.push(out.to_str().unwrap());
        args.extend(DEMO);
        args.extend(extra);
        ok(&args, &[]);
        let files = cache_files(&out);
        assert!(!files.is_empty(), "{name}: no teacher logits cached");
        let student = out.join("runs/r4-s0/model.safetensors");
        (files, compute_record(&student))
    };
    let (default, record) = sweep("default", &[]);
    assert_eq!(record["options"]["class_token_tail"], "auto");
    let mut seen = vec![default];
    for (flag, value, _, _, field, recorded) in SWITCHES {
        let (files, record) = sweep(field, &[flag, value]);
        assert_eq!(
            record["options"][field], recorded,
            "the student records {flag}"
        );
        assert!(
            seen.iter().all(|s| s.is_disjoint(&files)),
            "{flag} {value} reused another run's cached teacher logits: {files:?}"
        );
        seen.push(files);
    }
    // Profiling changes no number, so it keeps the key.
    let (profiled, _) = sweep("profiled", &["--profile"]);
    assert_eq!(profiled, seen[0]);
}
