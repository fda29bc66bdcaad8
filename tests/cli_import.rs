//! The command line on imported checkpoints (tests/fixtures/import/): a hub
//! folder evaluates, trains and factorizes at its own size and at another;
//! a head count nobody said is announced with its flag and recorded; a
//! backbone without a head (tests/fixtures/families/hf_clip) takes the
//! data's classes.

use effrank_engine::model::checkpoint::read_metadata;
use image::{Rgb, RgbImage};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
        .display()
        .to_string()
}

/// (success, stdout + stderr)
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "a panic:\n{text}");
    (out.status.success(), text)
}

fn ok(args: &[&str]) -> String {
    let (success, text) = run(args);
    assert!(success, "effrank-engine {args:?} failed:\n{text}");
    text
}

/// An image folder of the fixtures' five classes, two 8 px images each.
fn five_classes(root: &Path) -> String {
    classes(root, &["cat", "dog", "fox", "owl", "yak"])
}

/// An image folder of these classes, two 8 px images each.
fn classes(root: &Path, names: &[&str]) -> String {
    for (i, class) in names.iter().enumerate() {
        for split in ["train", "test"] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for j in 0..2u8 {
                let seed = 40 * i as u8 + 7 * j;
                RgbImage::from_fn(8, 8, |x, y| Rgb([seed + x as u8, seed + 3 * y as u8, seed]))
                    .save(dir.join(format!("{j}.png")))
                    .unwrap();
            }
        }
    }
    root.display().to_string()
}

/// The `run` metadata of an engine checkpoint, as JSON.
fn run_meta(path: &Path) -> serde_json::Value {
    serde_json::from_str(&read_metadata(path).unwrap()["run"]).unwrap()
}

#[test]
fn eval_reads_a_hub_folder_at_its_size_and_another() {
    let dir = tempfile::tempdir().unwrap();
    let data = five_classes(dir.path());
    let hf = fixture("hf_vit");
    let base = [
        "eval",
        "--checkpoint",
        &hf,
        "--data",
        &data,
        "--device",
        "cpu",
        "--json",
    ];
    for extra in [&[][..], &["--input-size", "48"][..]] {
        let text = ok(&[&base[..], extra].concat());
        assert!(text.contains("\"top1\""), "{text}");
        assert!(!text.contains("assuming"), "nothing was guessed:\n{text}");
        assert!(!text.contains("class 0"), "the classes agree:\n{text}");
    }
    let (success, text) = run(&[&base[..], &["--heads", "4"]].concat());
    assert!(!success && text.contains("num_attention_heads"), "{text}");
    // Other names than the head's id2label are announced.
    let other = classes(
        &dir.path().join("other"),
        &["ant", "bee", "cat", "dog", "eel"],
    );
    let text = ok(&[
        "eval",
        "--checkpoint",
        &hf,
        "--data",
        &other,
        "--device",
        "cpu",
    ]);
    assert!(
        text.contains(r#"class 0 of its head is "cat""#) && text.contains("\"ant\""),
        "{text}"
    );
}

#[test]
fn a_guessed_head_count_is_announced_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let tv = fixture("torchvision_vit.safetensors");
    let student = dir.path().join("s.safetensors");
    let s = student.to_str().unwrap();
    let text = ok(&["factorize", "--teacher", &tv, "--rank", "4", "--out", s]);
    assert!(
        text.contains("assuming 1") && text.contains("--heads N"),
        "{text}"
    );
    assert_eq!(run_meta(&student)["import"]["heads_from"], "guessed");
    let text = ok(&[
        "factorize",
        "--teacher",
        &tv,
        "--rank",
        "4",
        "--heads",
        "2",
        "--out",
        s,
    ]);
    assert!(!text.contains("assuming"), "{text}");
    let meta = run_meta(&student);
    assert_eq!(meta["import"]["heads_from"], "flag");
    assert_eq!(meta["import"]["heads"], 2);
}

#[test]
fn train_from_a_hub_folder_at_another_size_records_the_resampling() {
    let dir = tempfile::tempdir().unwrap();
    let data = five_classes(&dir.path().join("data"));
    let out = dir.path().join("teacher");
    let timm = fixture("timm_vit");
    ok(&[
        "train",
        "--init",
        &timm,
        "--input-size",
        "48",
        "--data",
        &data,
        "--epochs",
        "1",
        "--batch",
        "5",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    let model = out.join("model.safetensors");
    let config: serde_json::Value =
        serde_json::from_str(&read_metadata(&model).unwrap()["config"]).unwrap();
    assert_eq!(
        (config["image_size"].as_u64(), config["heads"].as_u64()),
        (Some(48), Some(2))
    );
    let import = &run_meta(&model)["import"];
    assert_eq!(import["heads_from"]["config"], "model_args.num_heads");
    assert_eq!(import["input_size"]["from"], 32);
    assert_eq!(import["input_size"]["to"], 48);
    // Its students carry the record on.
    let student = dir.path().join("s.safetensors");
    ok(&[
        "factorize",
        "--teacher",
        model.to_str().unwrap(),
        "--rank",
        "2",
        "--out",
        student.to_str().unwrap(),
    ]);
    assert_eq!(run_meta(&student)["import"], *import);
}

#[test]
fn a_sweeps_students_record_how_the_teacher_was_imported() {
    let dir = tempfile::tempdir().unwrap();
    let data = five_classes(&dir.path().join("data"));
    let out = dir.path().join("sweep");
    let tv = fixture("torchvision_vit.safetensors");
    let text = ok(&[
        "sweep",
        "--teacher",
        &tv,
        "--input-size",
        "48",
        "--data",
        &data,
        "--ranks",
        "2,4",
        "--epochs",
        "1",
        "--batch",
        "5",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        text.contains("assuming 1") && text.contains("--heads N"),
        "{text}"
    );
    for rank in [2, 4] {
        let student = out.join(format!("runs/r{rank}-s0/model.safetensors"));
        let import = &run_meta(&student)["import"];
        assert_eq!(import["heads_from"], "guessed", "rank {rank}");
        assert_eq!(import["naming"], "torchvision");
        assert_eq!(
            (
                import["input_size"]["from"].as_u64(),
                import["input_size"]["to"].as_u64()
            ),
            (Some(32), Some(48))
        );
    }
}

#[test]
fn a_backbone_without_a_head_trains_with_the_datas_classes() {
    let dir = tempfile::tempdir().unwrap();
    let data = five_classes(dir.path());
    let clip = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/hf_clip");
    let out = dir.path().join("teacher");
    ok(&[
        "train",
        "--init",
        clip.to_str().unwrap(),
        "--data",
        &data,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ]);
    let import = &run_meta(&out.join("model.safetensors"))["import"];
    assert_eq!(import["act"], "quick-gelu");
    assert_eq!(import["act_from"]["config"], "hidden_act");
    let (success, text) = run(&[
        "eval",
        "--checkpoint",
        clip.to_str().unwrap(),
        "--data",
        &data,
    ]);
    assert!(
        !success && text.contains("no classification head"),
        "{text}"
    );
}
