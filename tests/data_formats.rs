//! The data formats other libraries write (tests/fixtures/, written by
//! scripts/make_data_fixtures.py): torchvision's CIFAR python pickles and
//! Hugging Face parquet folders give the same tensors, bit for bit, as the
//! same images in CIFAR binaries and image folders; bad files are errors
//! naming the file and the key, row or global at fault; `train` and `eval`
//! run on each source end to end and record what they read.

use effrank_engine::data::cifar::CifarKind;
use effrank_engine::data::hf_parquet::ColumnChoice;
use effrank_engine::data::source::CifarFormat;
use effrank_engine::data::{load_data, DataSource, LoadOptions, Loaded};
use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn load(name: &str) -> Loaded {
    load_with(name, &LoadOptions::default())
}

fn load_with(name: &str, opts: &LoadOptions) -> Loaded {
    load_data(&fixture(name), opts).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn error(name: &str, opts: &LoadOptions) -> String {
    match load_data(&fixture(name), opts) {
        Ok(l) => panic!("{name} loaded ({}), expected an error", l.summary()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{p:?} not in: {text}");
    }
}

#[test]
fn one_image_set_in_every_cifar10_format_gives_the_same_tensors() {
    let binary = load("cifar10-bin");
    assert_eq!((binary.train.len(), binary.test.len()), (20, 10));
    let names = binary.train.class_names.clone().unwrap();
    assert_eq!(names[0], "airplane");
    for other in [
        "cifar10-py",
        "cifar10-py/cifar-10-batches-py",
        "cifar10-folder",
        "hf-parquet",
        "hf-parquet/data",
    ] {
        let data = load(other);
        // Images, labels, class count, class names and shape.
        assert_eq!(data.train, binary.train, "{other}: training split");
        assert_eq!(data.test, binary.test, "{other}: test split");
        assert_eq!(data.train.fingerprint(), binary.train.fingerprint());
    }
    assert_contains(
        &load("cifar10-py").summary(),
        &["CIFAR-10 (python pickles)", "20 train / 10 test"],
    );
    assert_contains(
        &load("hf-parquet").summary(),
        &[
            "Hugging Face parquet",
            "image column 'img', label column 'label', 10 classes (ClassLabel names)",
        ],
    );
}

#[test]
fn cifar100_pickles_equal_the_binaries_with_fine_labels_and_names() {
    let binary = load("cifar100-bin");
    let pickles = load("cifar100-py");
    assert_eq!(pickles.train, binary.train);
    assert_eq!(pickles.test, binary.test);
    assert_eq!(pickles.train.classes, 100);
    assert!(
        pickles.train.labels.iter().any(|&l| l >= 20),
        "fine labels, not coarse"
    );
    assert_eq!(pickles.train.class_names.as_ref().unwrap()[42], "fine_42");
}

#[test]
fn python_folders_resolve_from_the_root_torchvision_is_given() {
    for spec in ["cifar10-py", "cifar10-py/cifar-10-batches-py"] {
        let src = DataSource::resolve(&fixture(spec)).unwrap();
        let DataSource::Cifar {
            kind,
            format,
            train,
            test,
        } = &src
        else {
            panic!("{spec} resolved to {src:?}")
        };
        assert_eq!((*kind, *format), (CifarKind::Cifar10, CifarFormat::Python));
        let names: Vec<_> = train
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["data_batch_1", "data_batch_2"]);
        assert!(test.ends_with("cifar-10-batches-py/test_batch"));
    }
    let src = DataSource::resolve(&fixture("cifar100-py")).unwrap();
    assert!(
        matches!(
            src,
            DataSource::Cifar {
                kind: CifarKind::Cifar100,
                format: CifarFormat::Python,
                ..
            }
        ),
        "{src:?}"
    );
}

#[test]
fn parquet_png_and_jpeg_rows_decode_as_the_same_files_in_an_image_folder() {
    // hf-mixed has train.parquet, validation.parquet (the test split, as
    // there is no test file) and unsupervised.parquet (not read); some
    // rows are JPEG, some 40x40 (resized as a folder's images are). The
    // image folder holds the same encoded files.
    let src = DataSource::resolve(&fixture("hf-mixed")).unwrap();
    let DataSource::Parquet { train, test } = &src else {
        panic!("{src:?}")
    };
    assert!(
        train.len() == 1 && train[0].ends_with("train.parquet"),
        "{train:?}"
    );
    assert!(
        test.len() == 1 && test[0].ends_with("validation.parquet"),
        "{test:?}"
    );
    for size in [32, 16] {
        let opts = LoadOptions {
            image_size: size,
            ..LoadOptions::default()
        };
        let parquet = load_with("hf-mixed", &opts);
        let folder = load_with("hf-mixed-folder", &opts);
        assert_eq!((parquet.train.len(), parquet.test.len()), (12, 3));
        assert_eq!(parquet.train, folder.train, "size {size}");
        assert_eq!(parquet.test, folder.test, "size {size}");
        assert_eq!(parquet.train.height, size);
    }
}

#[test]
fn parquet_splits_are_found_by_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let touch = |name: &str| std::fs::write(dir.path().join(name), b"").unwrap();
    let spec = dir.path().to_str().unwrap();
    touch("train-00001-of-00002.parquet");
    touch("train-00000-of-00002.parquet");
    let e = format!("{:#}", DataSource::resolve(spec).unwrap_err());
    assert_contains(&e, &["missing test split", "'test' or 'validation'"]);
    touch("validation-00000-of-00001.parquet");
    touch("test-00000-of-00001.parquet");
    touch("unsupervised-00000-of-00001.parquet");
    let src = DataSource::resolve(spec).unwrap();
    let DataSource::Parquet { train, test } = &src else {
        panic!("{src:?}")
    };
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(
        names(train),
        [
            "train-00000-of-00002.parquet",
            "train-00001-of-00002.parquet"
        ]
    );
    assert_eq!(
        names(test),
        ["test-00000-of-00001.parquet"],
        "test wins over validation"
    );
    touch("train_test.parquet");
    let e = format!("{:#}", DataSource::resolve(spec).unwrap_err());
    assert_contains(
        &e,
        &["train_test.parquet names more than one split (train, test)"],
    );
}

#[test]
fn named_columns_are_used_and_checked() {
    let named = LoadOptions {
        columns: ColumnChoice {
            image: Some("img".into()),
            label: Some("label".into()),
        },
        ..LoadOptions::default()
    };
    assert_eq!(
        load_with("hf-parquet", &named).train,
        load("hf-parquet").train
    );
    let missing = LoadOptions {
        columns: ColumnChoice {
            image: None,
            label: Some("fine".into()),
        },
        ..LoadOptions::default()
    };
    assert_contains(
        &error("hf-parquet", &missing),
        &[
            "train-00000-of-00001.parquet",
            "no label column 'fine'",
            "columns: img, label",
        ],
    );
    assert_contains(
        &error("cifar10-bin", &named),
        &["--image-column and --label-column", "not parquet"],
    );
}

#[test]
fn bad_files_are_errors_naming_the_file_and_what_is_wrong() {
    let opts = LoadOptions::default();
    assert_contains(
        &error("bad/pickle-truncated", &opts),
        &["cifar-10-batches-py/data_batch_1", "truncated pickle"],
    );
    assert_contains(
        &error("bad/pickle-global", &opts),
        &[
            "cifar-10-batches-py/data_batch_1",
            "refusing global os.system",
            "nothing is executed",
        ],
    );
    assert_contains(
        &error("bad/parquet-no-image", &opts),
        &[
            "train-00000-of-00001.parquet",
            "no image column",
            "columns: pixels, label",
        ],
    );
    assert_contains(
        &error("bad/parquet-bad-label", &opts),
        &[
            "test-00000-of-00001.parquet: row 2 column 'label'",
            "label 5 is out of range for 2 classes",
        ],
    );
    assert_contains(
        &error("bad/parquet-truncated", &opts),
        &[
            "train-00000-of-00001.parquet",
            "not a readable parquet file",
        ],
    );
}

/// Runs the binary; the text of stdout and stderr, and whether it succeeded.
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

#[test]
fn train_and_eval_run_on_each_new_source_and_record_its_columns() {
    let tmp = tempfile::tempdir().unwrap();
    // CIFAR's own statistics for CIFAR in any format, as for the binaries.
    let sources: [(&str, &[&str], &str); 2] = [
        ("cifar10-py", &[], "cifar"),
        ("hf-parquet", &["--label-column", "label"], "half"),
    ];
    for (name, extra, normalize) in sources {
        let out = tmp.path().join(name);
        let out = out.to_str().unwrap();
        let data = fixture(name);
        let mut args = vec![
            "train", "--model", "vit-demo", "--epochs", "1", "--batch", "10", "--device", "cpu",
            "--quiet", "--data", &data, "--out", out,
        ];
        args.extend(extra);
        let (ok, text) = run(&args);
        assert!(ok, "train on {name}: {text}");
        let checkpoint = format!("{out}/model.safetensors");
        // eval takes the data, and the parquet columns, the run recorded.
        let (ok, text) = run(&[
            "eval",
            "--checkpoint",
            &checkpoint,
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(ok, "eval on {name}: {text}");
        let json = text.lines().find(|l| l.starts_with('{')).unwrap();
        let result: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(result["top1"], result["recorded_top1"], "{name}: {text}");
        assert_eq!(result["normalize"], normalize, "{name}: {text}");
        let meta = std::fs::read(&checkpoint).unwrap();
        let recorded = String::from_utf8_lossy(&meta);
        assert_eq!(
            recorded.contains(r#"\"label_column\":\"label\""#),
            !extra.is_empty(),
            "{name}"
        );
    }
}
