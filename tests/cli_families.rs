//! The whole pipeline from the command line for every ViT family
//! (`model::family`), on small models of the demo's shape given as JSON
//! configs: train a teacher, factorize it (the student keeps the family),
//! distill one epoch, eval, and the weight spectrum; one family through a
//! sweep. On the CPU.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");
const DEMO: [&str; 4] = ["--data", "demo", "--demo-images", "300"];

fn ok(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs");
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

/// The demo's shape with a family's fields.
fn config(dir: &Path, name: &str, family: Value) -> String {
    let mut cfg = json!({
        "image_size": 16, "channels": 3, "patch": 4, "width": 32, "depth": 2,
        "heads": 2, "mlp": 64, "classes": 10
    });
    for (k, v) in family.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, cfg.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

fn families() -> Vec<(&'static str, Value)> {
    vec![
        (
            "deit-distilled",
            json!({"dist_token": true, "pool": "distilled"}),
        ),
        (
            "deit3",
            json!({"pos_embed": "patches-only", "layer_scale": true}),
        ),
        (
            "dinov2-registers",
            json!({"registers": 4, "pos_embed": "patches-only", "layer_scale": true}),
        ),
        (
            "dinov2-classifier",
            json!({"layer_scale": true, "pool": "class-and-mean"}),
        ),
        (
            "clip",
            json!({"norm_pre": true, "patch_bias": false, "act": "quick-gelu", "ln_eps": 1e-5}),
        ),
        (
            "average-pool",
            json!({"class_token": false, "pool": "average"}),
        ),
        (
            "no-qkv-bias",
            json!({"qkv_bias": false, "act": "gelu-tanh"}),
        ),
    ]
}

fn metadata_config(checkpoint: &Path) -> Value {
    let bytes = std::fs::read(checkpoint).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    serde_json::from_str(header["__metadata__"]["config"].as_str().unwrap()).unwrap()
}

#[test]
fn every_family_runs_train_factorize_distill_eval_and_spectrum() {
    let dir = tempfile::tempdir().unwrap();
    for (name, family) in families() {
        let model = config(dir.path(), name, family.clone());
        let run = dir.path().join(name);
        let teacher = run.join("teacher");
        let mut args = vec![
            "train",
            "--model",
            &model,
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            teacher.to_str().unwrap(),
        ];
        args.extend(DEMO);
        ok(&args);
        let teacher_file = teacher.join("model.safetensors");
        let recorded = metadata_config(&teacher_file);
        for (k, v) in family.as_object().unwrap() {
            assert_eq!(&recorded[k], v, "{name}: the teacher records {k}");
        }
        let student = run.join("student.safetensors");
        let text = ok(&[
            "factorize",
            "--teacher",
            teacher_file.to_str().unwrap(),
            "--rank",
            "8",
            "--out",
            student.to_str().unwrap(),
        ]);
        assert!(text.contains("blocks.1.mlp.fc2"), "{name}: {text}");
        assert_eq!(
            metadata_config(&student)["pool"],
            recorded["pool"],
            "{name}: the student keeps the pooling"
        );
        let distilled = run.join("distilled");
        let mut args = vec![
            "distill",
            "--teacher",
            teacher_file.to_str().unwrap(),
            "--rank",
            "8",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            distilled.to_str().unwrap(),
        ];
        args.extend(DEMO);
        let text = ok(&args);
        assert!(text.contains("student: test top-1"), "{name}: {text}");
        let distilled_file = distilled.join("model.safetensors");
        let mut args = vec![
            "eval",
            "--checkpoint",
            distilled_file.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend(DEMO);
        let text = ok(&args);
        assert!(text.contains("top-1"), "{name}: {text}");
        let spectrum = run.join("spectrum");
        ok(&[
            "analyze",
            "--spectrum",
            teacher_file.to_str().unwrap(),
            "--out",
            spectrum.to_str().unwrap(),
            "--no-plot",
        ]);
        assert!(spectrum.join("spectrum.json").exists(), "{name}");
    }
}

#[test]
fn train_act_sets_the_activation_of_a_preset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clip");
    let mut args = vec![
        "train",
        "--model",
        "vit-demo",
        "--act",
        "quick-gelu",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(DEMO);
    ok(&args);
    let recorded = metadata_config(&out.join("model.safetensors"));
    assert_eq!(recorded["act"], "quick-gelu");
}

#[test]
fn a_family_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let model = config(
        dir.path(),
        "dinov2-registers",
        json!({"registers": 2, "pos_embed": "patches-only", "layer_scale": true}),
    );
    let teacher = dir.path().join("teacher");
    let mut args = vec![
        "train",
        "--model",
        &model,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        teacher.to_str().unwrap(),
    ];
    args.extend(DEMO);
    ok(&args);
    let out = dir.path().join("sweep");
    let teacher_file = teacher.join("model.safetensors");
    let mut args = vec![
        "sweep",
        "--teacher",
        teacher_file.to_str().unwrap(),
        "--ranks",
        "2,8",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(DEMO);
    ok(&args);
    assert!(out.join("analysis.json").exists());
}
