//! Image folders at the model's size, and image folders streamed.
//!
//! - A model of input size 64 evaluated on 64 px PNGs with no size flag sees
//!   them at 64 px: its logits equal those of `--image-size 64`, and differ
//!   from a stored 32 px copy (which warns). A run trained on them records 64.
//! - A folder larger than `--data-memory` is streamed: an epoch trains to the
//!   same weights and metrics, and evaluates to the same logits, bit for bit,
//!   as with the folder in memory; the streamed split has the in-memory
//!   split's fingerprint.

use effrank_engine::data::{load_data, LoadOptions};
use effrank_engine::model::checkpoint::{read_metadata, save_checkpoint};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::dense_ranks;
use effrank_engine::model::VitConfig;
use effrank_engine::provenance::RunMeta;
use effrank_engine::rng::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Run the engine; its stderr, after checking that it succeeded.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "effrank-engine {args:?} failed:\n{}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// `root/{train,test}/{a,b}/NN.png`: seeded noise of `side` px, `per_class`
/// training and 2 test images per class.
fn folder(root: &Path, side: u32, per_class: usize) {
    let mut rng = Rng::from_keys(&[side as u64, per_class as u64]);
    for (split, n) in [("train", per_class), ("test", 2)] {
        for class in ["a", "b"] {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(side, side, |_, _| {
                    image::Rgb([
                        rng.below(256) as u8,
                        rng.below(256) as u8,
                        rng.below(256) as u8,
                    ])
                });
                let format = if i % 3 == 2 {
                    image::ImageFormat::Jpeg
                } else {
                    image::ImageFormat::Png
                };
                let ext = if format == image::ImageFormat::Png {
                    "png"
                } else {
                    "jpg"
                };
                img.save_with_format(dir.join(format!("{i:02}.{ext}")), format)
                    .unwrap();
            }
        }
    }
}

/// The logits tensor of an `eval --dump-logits` file, as raw bytes.
fn logits(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits").unwrap().data().to_vec()
}

fn eval_logits(checkpoint: &Path, data: &Path, extra: &[&str], dump: &Path) -> String {
    let mut args = vec![
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
        "--dump-logits",
        dump.to_str().unwrap(),
    ];
    args.extend(extra);
    ok(&args)
}

#[test]
fn a_folder_is_stored_at_the_models_input_size_without_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    folder(&data, 64, 3);
    // A 64 px model that records nothing (as another library's file).
    let cfg = VitConfig {
        image_size: 64,
        patch: 16,
        ..VitConfig::preset("vit-demo", 2).unwrap()
    };
    let ranks = dense_ranks(&cfg);
    let checkpoint = dir.path().join("model64.safetensors");
    save_checkpoint(
        &checkpoint,
        &cfg,
        &ranks,
        &init_params(&cfg, &ranks, 7),
        &BTreeMap::new(),
    )
    .unwrap();
    let dump = |name: &str| dir.path().join(name);
    let err = eval_logits(&checkpoint, &data, &["--normalize", "half"], &dump("auto"));
    assert!(!err.contains("warning: the images"), "{err}");
    eval_logits(
        &checkpoint,
        &data,
        &["--normalize", "half", "--image-size", "64"],
        &dump("given"),
    );
    let err = eval_logits(
        &checkpoint,
        &data,
        &["--normalize", "half", "--image-size", "32"],
        &dump("small"),
    );
    assert!(
        err.contains("warning: the images") && err.contains("32 px") && err.contains("64 px"),
        "{err}"
    );
    assert_eq!(logits(&dump("auto")), logits(&dump("given")));
    assert_ne!(logits(&dump("auto")), logits(&dump("small")));

    // A run trained on the folder records the size and why.
    let out = dir.path().join("run");
    ok(&[
        "train",
        "--model",
        "vit-demo",
        "--input-size",
        "64",
        "--patch",
        "16",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--device",
        "cpu",
        "--quiet",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let model = out.join("model.safetensors");
    let meta = RunMeta::from_metadata(&read_metadata(&model).unwrap(), &model)
        .unwrap()
        .unwrap();
    let recorded = meta.data.unwrap();
    assert_eq!(recorded.image_size, 64);
    assert_eq!(
        recorded.image_size_from.as_deref(),
        Some("model input size")
    );
}

/// `train` one epoch on `data` with `--data-memory gib` into `out`.
fn train_epoch(data: &Path, out: &Path, gib: &str) -> String {
    ok(&[
        "train",
        "--model",
        "vit-demo",
        "--epochs",
        "1",
        "--batch",
        "4",
        "--device",
        "cpu",
        "--data",
        data.to_str().unwrap(),
        "--data-memory",
        gib,
        "--out",
        out.to_str().unwrap(),
    ])
}

/// Every tensor of a safetensors file, by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

/// `metrics.jsonl` less the timing and the process's peak memory.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("images_per_s");
            v.as_object_mut().unwrap().remove("peak_host_bytes");
            v
        })
        .collect()
}

/// A budget (in GiB, 42949 bytes) that holds a few batches of 4 images of
/// 16 px (768 bytes each) but not the 88 images.
const TINY: &str = "0.00004";

#[test]
fn a_streamed_epoch_equals_the_in_memory_epoch_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    folder(&data, 16, 42);
    let (memory, streamed) = (dir.path().join("memory"), dir.path().join("streamed"));
    let said = train_epoch(&data, &memory, "1");
    assert!(!said.contains("streamed"), "{said}");
    let said = train_epoch(&data, &streamed, TINY);
    assert!(said.contains("streamed"), "{said}");
    let (a, b) = (
        memory.join("model.safetensors"),
        streamed.join("model.safetensors"),
    );
    assert_eq!(tensors(&a), tensors(&b));
    assert_eq!(metrics(&memory), metrics(&streamed));
    let data_of = |p: &PathBuf| {
        RunMeta::from_metadata(&read_metadata(p).unwrap(), p)
            .unwrap()
            .unwrap()
            .data
            .unwrap()
    };
    assert_eq!(data_of(&a), data_of(&b));

    let (x, y) = (dir.path().join("x"), dir.path().join("y"));
    eval_logits(&a, &data, &["--data-memory", "1"], &x);
    eval_logits(&a, &data, &["--data-memory", TINY], &y);
    assert_eq!(logits(&x), logits(&y));

    // A sweep distils through the teacher-logit cache, streamed or not.
    let sweep = |out: &Path, gib: &str| {
        ok(&[
            "sweep",
            "--teacher",
            a.to_str().unwrap(),
            "--ranks",
            "4",
            "--epochs",
            "1",
            "--batch",
            "4",
            "--device",
            "cpu",
            "--no-analyze",
            "--data",
            data.to_str().unwrap(),
            "--data-memory",
            gib,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let (memory, streamed) = (
        dir.path().join("sweep-memory"),
        dir.path().join("sweep-streamed"),
    );
    sweep(&memory, "1");
    assert!(sweep(&streamed, TINY).contains("streamed"));
    let students = models_under(&memory);
    assert!(!students.is_empty());
    assert_eq!(students, models_under(&streamed));
    assert!(std::fs::read_dir(memory.join("cache")).unwrap().count() > 0);
}

/// The tensors of every `model.safetensors` under `dir`, by relative path.
fn models_under(dir: &Path) -> BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>> {
    let mut found = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name().is_some_and(|n| n == "model.safetensors") {
                let rel = path.strip_prefix(dir).unwrap().to_path_buf();
                found.insert(rel, tensors(&path));
            }
        }
    }
    found
}

#[test]
fn a_streamed_split_has_the_fingerprint_of_its_decoded_copy() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 16, 12);
    // An unreadable image, left out by skip_bad in both paths.
    std::fs::write(dir.path().join("train/a/99.png"), b"not a png").unwrap();
    let opts = |memory_budget| LoadOptions {
        image_size: 12,
        skip_bad: true,
        memory_budget,
        ..LoadOptions::default()
    };
    let spec = dir.path().to_str().unwrap();
    let memory = load_data(spec, &opts(None)).unwrap();
    let streamed = load_data(spec, &opts(Some(4096))).unwrap();
    assert!(!memory.train.is_streamed());
    assert!(streamed.train.is_streamed() && streamed.test.is_streamed());
    assert_eq!(streamed.skipped.len(), 1);
    assert_eq!(memory.train.labels, streamed.train.labels);
    assert_eq!(memory.train.fingerprint(), streamed.train.fingerprint());
    assert_eq!(memory.test.fingerprint(), streamed.test.fingerprint());
    let pick = [5, 0, 17];
    assert_eq!(
        memory.train.subset(&pick).unwrap().fingerprint(),
        streamed.train.subset(&pick).unwrap().fingerprint()
    );
    // Without skip_bad, the bad file is named.
    let err = load_data(
        spec,
        &LoadOptions {
            skip_bad: false,
            ..opts(Some(4096))
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("99.png"), "{err:#}");
}

/// The data `checkpoint`'s run recorded.
fn recorded_data(checkpoint: &Path) -> effrank_engine::provenance::DataRef {
    RunMeta::from_metadata(&read_metadata(checkpoint).unwrap(), checkpoint)
        .unwrap()
        .unwrap()
        .data
        .unwrap()
}

#[test]
fn resumed_runs_keep_the_size_they_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    folder(&data, 16, 4);
    let (teacher, student) = (dir.path().join("teacher"), dir.path().join("student"));
    let train = |epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "train", "--model", "vit-demo", "--epochs", epochs, "--batch", "4", "--device", "cpu",
        ];
        args.extend(["--data", data.to_str().unwrap()]);
        args.extend(["--out", teacher.to_str().unwrap()]);
        args.extend(extra);
        ok(&args)
    };
    // Below the model's 16 px: said out loud, and recorded.
    let said = train("1", &["--image-size", "12"]);
    assert!(
        said.contains("warning: the images") && said.contains("12 px"),
        "{said}"
    );
    let said = train("2", &[]);
    assert!(!said.contains("other data"), "{said}");
    let model = teacher.join("model.safetensors");
    let recorded = recorded_data(&model);
    assert_eq!(recorded.image_size, 12);
    assert_eq!(
        recorded.image_size_from.as_deref(),
        Some("recorded by the run")
    );

    let distill = |epochs: &str, extra: &[&str]| {
        let mut args = vec![
            "distill", "--rank", "4", "--epochs", epochs, "--batch", "4", "--device", "cpu",
        ];
        args.extend(["--teacher", model.to_str().unwrap()]);
        args.extend(["--data", data.to_str().unwrap()]);
        args.extend(["--out", student.to_str().unwrap()]);
        args.extend(extra);
        ok(&args)
    };
    // The student's run is at 16 px; resumed, it stays there, not at the teacher's 12.
    distill("1", &["--image-size", "16"]);
    let said = distill("2", &[]);
    assert!(!said.contains("run being resumed"), "{said}");
    assert_eq!(
        recorded_data(&student.join("model.safetensors")).image_size,
        16
    );
}

#[test]
fn a_source_not_resized_at_load_records_its_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    ok(&[
        "train",
        "--model",
        "vit-demo",
        "--input-size",
        "32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--data",
        "demo",
        "--demo-images",
        "40",
        "--out",
        out.to_str().unwrap(),
    ]);
    // The demo is 16 px whatever the model's 32 px input.
    let recorded = recorded_data(&out.join("model.safetensors"));
    assert_eq!(recorded.image_size, 16);
    assert_eq!(
        recorded.image_size_from.as_deref(),
        Some("stored by the source")
    );
}

/// Parquet data larger than the budget is streamed from its encoded rows:
/// the same epoch, bit for bit, and the same data record, as in memory.
#[test]
fn streamed_parquet_equals_parquet_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-parquet");
    // One epoch at batch 2 with the budget `gib`, and `extra` flags.
    let epoch = |out: &Path, gib: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            "vit-demo",
            "--epochs",
            "1",
            "--batch",
            "2",
            "--data",
            data.to_str().unwrap(),
            "--data-memory",
            gib,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let (memory, streamed) = (dir.path().join("memory"), dir.path().join("streamed"));
    let said = epoch(&memory, "1", &[]);
    assert!(!said.contains("streamed"), "{said}");
    // 5.4 kB: a few batches of 2 images of 16 px (768 bytes each), but
    // neither the decoded set nor the files (21 kB): the images are spilled
    // to a temporary file and read back from it.
    let said = epoch(&streamed, "0.000005", &[]);
    assert!(said.contains("temporary file"), "{said}");
    let same = |memory: &Path, streamed: &Path| {
        let (a, b) = (
            memory.join("model.safetensors"),
            streamed.join("model.safetensors"),
        );
        assert_eq!(tensors(&a), tensors(&b));
        assert_eq!(metrics(memory), metrics(streamed));
        assert_eq!(recorded_data(&a), recorded_data(&b));
    };
    same(&memory, &streamed);
    // Stored at 64 px (12 kB each), the decoded set (369 kB) exceeds 107 kB
    // and the files do not: streamed from the encoded images held in memory.
    let at_64 = |out: &Path, gib: &str| epoch(out, gib, &["--image-size", "64"]);
    let (memory, streamed) = (dir.path().join("memory64"), dir.path().join("streamed64"));
    assert!(!at_64(&memory, "1").contains("streamed"));
    let said = at_64(&streamed, "0.0001");
    assert!(
        said.contains("streamed") && !said.contains("temporary file"),
        "{said}"
    );
    same(&memory, &streamed);
}

/// Peak memory follows the budget, not the data: a folder of 404 images
/// stored at 224 px (61 MB decoded) evaluated with its images in memory,
/// then streamed within 8 MiB; the streamed run's peak is lower by at
/// least most of the difference.
#[test]
fn a_streamed_folder_is_not_held_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    folder(&data, 16, 200);
    let cfg = VitConfig::preset("vit-demo", 2).unwrap();
    let ranks = dense_ranks(&cfg);
    let checkpoint = dir.path().join("model.safetensors");
    save_checkpoint(
        &checkpoint,
        &cfg,
        &ranks,
        &init_params(&cfg, &ranks, 7),
        &BTreeMap::new(),
    )
    .unwrap();
    let peak = |gib: &str| -> Option<u64> {
        let out = run(&[
            "eval",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--normalize",
            "half",
            "--image-size",
            "224",
            "--data-memory",
            gib,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["peak_host_bytes"].as_u64()
    };
    let (Some(held), Some(streamed)) = (peak("1"), peak("0.0078125")) else {
        eprintln!("no peak recorded (no /proc/self/status): skipped");
        return;
    };
    let decoded = 404 * 3 * 224 * 224;
    let budget = 8 << 20;
    eprintln!("peak: {held} bytes in memory, {streamed} streamed");
    assert!(
        streamed + (decoded - budget) * 8 / 10 <= held,
        "in memory {held} bytes, streamed {streamed}"
    );
}
