//! Property-based fuzzing of every parser of user input: CIFAR binaries,
//! CIFAR python pickles, Hugging Face parquet files, image folders, results
//! JSON lines, the rank/accuracy CSV, model config JSON, checkpoint files and
//! their metadata, PyTorch checkpoints, hub folders' config.json, and the
//! small flag parsers. Each gets thousands of random and mutated inputs
//! (mutations of a valid sample: bytes flipped, inserted, deleted, numbers
//! swapped for extreme ones, truncation); every input must give a result or
//! an error, never a panic (proptest counts a panic as a failure and
//! shrinks it to a minimal input).

use effrank_engine::analysis::read_measurements;
use effrank_engine::data::cifar::{parse_records, CifarKind};
use effrank_engine::data::cifar_pickle;
use effrank_engine::data::{load_data, LoadOptions};
use effrank_engine::model::checkpoint::save_checkpoint;
use effrank_engine::model::import::{load_any, ImportOptions};
use effrank_engine::model::init::init_params;
use effrank_engine::model::params::uniform_ranks;
use effrank_engine::model::VitConfig;
use effrank_engine::ops::gelu::Activation;
use effrank_engine::results::read_records_file;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Cases per property (`EFFRANK_FUZZ_CASES` overrides, e.g. for a long run).
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("EFFRANK_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Numbers that break naive arithmetic, as text.
const EXTREMES: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "-1e308",
    "NaN",
    "inf",
    "18446744073709551615",
    "4294967296",
    "9007199254740993",
    "1.5",
    "\"7\"",
    "null",
    "[]",
    "{}",
    "true",
];

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Replace the n-th run of digits with an extreme number.
    Number(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<usize>(), 0..EXTREMES.len()).prop_map(|(i, e)| Edit::Number(i, e)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match e {
            Edit::Flip(i, b) => {
                if !bytes.is_empty() {
                    bytes[i % n] ^= b | 1;
                }
            }
            Edit::Insert(i, b) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Edit::Delete(i, k) => {
                let at = i % n;
                let end = (at + k).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
            Edit::Number(i, ex) => {
                let runs: Vec<(usize, usize)> = digit_runs(&bytes);
                if !runs.is_empty() {
                    let (a, b) = runs[i % runs.len()];
                    bytes.splice(a..b, EXTREMES[*ex].bytes());
                }
            }
            Edit::Truncate(i) => bytes.truncate(i % n),
        }
    }
    bytes
}

fn digit_runs(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    runs
}

fn mutated(sample: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(edit(), 1..6).prop_map(move |edits| apply(sample.clone(), &edits))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---- CIFAR binaries ----------------------------------------------------

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn cifar_records_of_any_bytes(hundred in any::<bool>(), records in 0usize..4, tail in 0usize..40, fill in any::<u8>(), labels in prop::collection::vec(any::<u8>(), 8)) {
        let kind = if hundred { CifarKind::Cifar100 } else { CifarKind::Cifar10 };
        let mut bytes = vec![fill; records * kind.record_len() + tail];
        for (r, l) in labels.iter().enumerate().take(records) {
            for k in 0..kind.label_bytes() {
                bytes[r * kind.record_len() + k] = *l;
            }
        }
        let (mut images, mut lab) = (Vec::new(), Vec::new());
        let _ = parse_records(kind, Path::new("fuzz.bin"), &bytes, &mut images, &mut lab);
    }
}

proptest! {
    #![proptest_config(cases(300))]

    /// Whole CIFAR folders: the files' sizes and contents at random.
    #[test]
    fn cifar_folders_of_any_files(train in prop::collection::vec(any::<u8>(), 0..7000), test in prop::collection::vec(any::<u8>(), 0..4000), ten in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        if ten {
            write(dir.path(), "data_batch_1.bin", &train);
            write(dir.path(), "test_batch.bin", &test);
        } else {
            write(dir.path(), "train.bin", &train);
            write(dir.path(), "test.bin", &test);
        }
        let _ = load_data(dir.path().to_str().unwrap(), &LoadOptions::default());
    }
}

// ---- CIFAR python pickles and parquet (tests/fixtures/) ------------------

fn fixture(path: &str) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::read(root.join(path)).unwrap()
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Mutations of a batch and a meta pickle as the official files hold them.
    #[test]
    fn cifar_pickles_of_mutated_bytes(batch in mutated(fixture("cifar10-py/cifar-10-batches-py/data_batch_1")), meta in mutated(fixture("cifar100-py/cifar-100-python/meta"))) {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let _ = cifar_pickle::parse_batch(CifarKind::Cifar10, Path::new("fuzz"), &batch, &mut images, &mut labels);
        let _ = cifar_pickle::parse_class_names(CifarKind::Cifar100, Path::new("fuzz"), &meta);
    }
}

proptest! {
    #![proptest_config(cases(300))]

    /// A parquet folder whose training file is a mutation of the fixture's.
    #[test]
    fn parquet_files_of_mutated_bytes(train in mutated(fixture("hf-parquet/data/train-00000-of-00001.parquet"))) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "train.parquet", &train);
        write(dir.path(), "test.parquet", &fixture("hf-parquet/data/test-00000-of-00001.parquet"));
        let _ = load_data(dir.path().to_str().unwrap(), &LoadOptions::default());
    }
}

// ---- image folders -----------------------------------------------------

fn tiny_png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([seed, x as u8 * 40, y as u8 * 60]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

proptest! {
    #![proptest_config(cases(500))]

    /// Class folders of mutated PNGs, random bytes named .jpg, empty class
    /// folders and stray files.
    #[test]
    fn image_folders_of_any_files(png in mutated(tiny_png(3)), junk in prop::collection::vec(any::<u8>(), 0..64), empty_class in any::<bool>(), size in 0usize..9, skip_bad in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        for split in ["train", "test"] {
            let class = dir.path().join(split).join("a");
            std::fs::create_dir_all(&class).unwrap();
            write(&class, "good.png", &tiny_png(7));
            write(&class, "fuzz.png", &png);
            write(&class, "junk.jpg", &junk);
            write(&class, "notes.txt", b"not an image");
            if empty_class {
                std::fs::create_dir_all(dir.path().join(split).join("b")).unwrap();
            }
        }
        let opts = LoadOptions { image_size: size, skip_bad, ..LoadOptions::default() };
        let _ = load_data(dir.path().to_str().unwrap(), &opts);
    }
}

// ---- results JSON lines and the CSV --------------------------------------

const RESULTS: &str = concat!(
    r#"{"kind":"teacher","top1":0.9,"top5":0.99,"params":1000}"#,
    "\n",
    r#"{"kind":"student","rank":4,"seed":0,"top1":0.5,"top5":0.9,"params":100,"teacher_params":1000,"compression":10.0,"epochs":2,"wall_s":1.5,"host":"h","settings":{"loss":{"ce":0.0}},"resumed_from_epoch":0}"#,
    "\n",
    r#"{"kind":"student","rank":8,"seed":1,"top1":0.7,"top5":0.95,"params":180,"teacher_params":1000,"compression":5.5,"epochs":2,"wall_s":1.5,"host":"h","settings":{}}"#,
    "\n"
);

const CSV: &str =
    "rank,accuracy,seed,params\n2,0.31,0,120\n4,0.52,0,140\n8,0.66,1,180\n16,0.7,0,260\n";

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn results_files_of_mutated_records(bytes in mutated(RESULTS.as_bytes().to_vec())) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "results.jsonl", &bytes);
        let _ = read_records_file(&p);
        let _ = read_measurements(dir.path());
    }

    #[test]
    fn csv_of_mutated_rows(bytes in mutated(CSV.as_bytes().to_vec())) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "points.csv", &bytes);
        let _ = read_measurements(&p);
    }

    #[test]
    fn csv_of_random_tokens(rows in prop::collection::vec(prop::collection::vec(prop_oneof![Just("rank".to_string()), Just("accuracy".to_string()), Just("seed".to_string()), (0usize..EXTREMES.len()).prop_map(|i| EXTREMES[i].to_string()), any::<u32>().prop_map(|v| v.to_string()), "[ -~]{0,6}"], 0..5), 0..8)) {
        let text: String = rows.iter().map(|r| r.join(",") + "\n").collect();
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "points.csv", text.as_bytes());
        let _ = read_measurements(&p);
    }
}

// ---- model config JSON -----------------------------------------------------

proptest! {
    #![proptest_config(cases(3000))]

    /// A valid shape with one or two fields set to any number, extreme
    /// ones often: validate must say no, not overflow, and a shape it
    /// accepts must have sizes that do not overflow.
    #[test]
    fn configs_of_any_numbers(fields in prop::collection::vec((0usize..8, prop_oneof![0usize..70, Just(usize::MAX), Just(1usize << 32), Just(1usize << 16), any::<usize>()]), 1..3), eps in prop_oneof![Just(1e-6f32), any::<f32>()]) {
        let mut cfg = VitConfig::preset("vit-demo", 10).unwrap();
        cfg.ln_eps = eps;
        for (i, v) in fields {
            let f = [&mut cfg.image_size, &mut cfg.channels, &mut cfg.patch, &mut cfg.width, &mut cfg.depth, &mut cfg.heads, &mut cfg.mlp, &mut cfg.classes];
            *f.into_iter().nth(i).unwrap() = v;
        }
        if cfg.validate().is_ok() {
            let _ = (cfg.tokens(), cfg.patch_dim(), cfg.head_dim());
            let _ = effrank_engine::model::params::param_count(&cfg, &effrank_engine::model::params::dense_ranks(&cfg));
        }
    }

    #[test]
    fn config_files_of_mutated_json(bytes in mutated(serde_json::to_vec(&VitConfig::preset("vit-demo", 10).unwrap()).unwrap())) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "model.json", &bytes);
        let _ = VitConfig::from_name_or_file(p.to_str().unwrap(), 10);
    }
}

// ---- checkpoints and their metadata --------------------------------------

/// A tiny low-rank engine checkpoint (valid), its bytes and metadata.
fn checkpoint_sample() -> (Vec<u8>, BTreeMap<String, String>) {
    static SAMPLE: std::sync::OnceLock<(Vec<u8>, BTreeMap<String, String>)> =
        std::sync::OnceLock::new();
    SAMPLE
        .get_or_init(|| {
            let cfg = VitConfig { image_size: 8, channels: 3, patch: 4, width: 8, depth: 1, heads: 2, mlp: 16, classes: 3, ln_eps: 1e-6, family: Default::default() };
            let ranks = uniform_ranks(&cfg, 2);
            let params = init_params(&cfg, &ranks, 1);
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("m.safetensors");
            let meta = BTreeMap::from([("run".to_string(), r#"{"role":"student","normalize":"half","data":null,"loss":null,"teacher":null,"factor_init":"svd","fit":null,"optimizer":null,"epoch":null,"metrics":null}"#.to_string())]);
            save_checkpoint(&p, &cfg, &ranks, &params, &meta).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let meta = effrank_engine::model::checkpoint::read_metadata(&p).unwrap();
            (bytes, meta)
        })
        .clone()
}

proptest! {
    #![proptest_config(cases(2000))]

    /// Byte mutations anywhere in the file (mostly its JSON header, where
    /// the digits are).
    #[test]
    fn checkpoint_files_of_mutated_bytes(bytes in mutated(checkpoint_sample().0)) {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.safetensors", &bytes);
        if let Ok(ck) = load_any(&p, &ImportOptions::default()) {
            let _ = effrank_engine::provenance::RunMeta::from_metadata(&ck.metadata, &p);
        }
        let _ = effrank_engine::model::checkpoint::read_metadata(&p);
        let _ = effrank_engine::analysis::weight_spectra(&p);
    }

    /// Metadata values (config, ranks, run) replaced by mutations of themselves.
    #[test]
    fn checkpoint_metadata_of_mutated_values(which in 0usize..3, value in mutated(b"{\"image_size\":8,\"channels\":3,\"patch\":4,\"width\":8,\"depth\":1,\"heads\":2,\"mlp\":16,\"classes\":3,\"ln_eps\":1e-6}".to_vec()), ranks in mutated(b"[[2,2,2,2,2,2]]".to_vec())) {
        use safetensors::SafeTensors;
        let (bytes, meta) = checkpoint_sample();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut meta: std::collections::HashMap<String, String> = meta.into_iter().collect();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match which {
            0 => { meta.insert("config".into(), text(&value)); }
            1 => { meta.insert("ranks".into(), text(&ranks)); }
            _ => { meta.insert("run".into(), text(&value)); }
        }
        let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
        let out = safetensors::serialize(tensors, &Some(meta)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "m.safetensors", &out);
        if let Ok(ck) = load_any(&p, &ImportOptions::default()) {
            let _ = effrank_engine::provenance::RunMeta::from_metadata(&ck.metadata, &p);
        }
    }
}

// ---- hub folders: config.json beside the weights ---------------------------

/// The config.json of a hub folder fixture (tests/fixtures/import/).
fn hub_config(folder: &str) -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import");
    std::fs::read(root.join(folder).join("config.json")).unwrap()
}

proptest! {
    #![proptest_config(cases(500))]

    /// A Hugging Face or timm config.json mutated, beside its own weights,
    /// read with any --heads and --input-size.
    #[test]
    fn hub_folders_of_mutated_configs(timm in any::<bool>(), hf in mutated(hub_config("hf_vit")), tm in mutated(hub_config("timm_vit")), heads in prop::option::of(prop_oneof![0usize..5, Just(usize::MAX)]), size in prop::option::of(prop_oneof![0usize..80, Just(1usize << 40), Just(usize::MAX)])) {
        let folder = if timm { "timm_vit" } else { "hf_vit" };
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import");
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(root.join(folder).join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        write(dir.path(), "config.json", if timm { &tm } else { &hf });
        let opts = ImportOptions { heads, act: None, new_classes: None, input_size: size };
        if let Ok(ck) = load_any(dir.path(), &opts) {
            let record = ck.import.unwrap();
            let _ = record.notices(ck.cfg.width);
            let _ = record.class_names_differ(&["x".to_string()]);
        }
    }
}

/// Family fixtures (tests/fixtures/families/) whose config.json says the
/// most: registers, LayerScale, pooling, the activation.
const FAMILY_FOLDERS: [&str; 4] = [
    "hf_dinov2_reg_cls",
    "timm_dinov2_reg4",
    "hf_clip",
    "timm_deit_distilled",
];

fn family_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families")
}

proptest! {
    #![proptest_config(cases(500))]

    /// A family's config.json mutated, beside its own weights, read with
    /// any --act and --input-size.
    #[test]
    fn family_folders_of_mutated_configs((i, config) in (0..FAMILY_FOLDERS.len()).prop_flat_map(|i| (Just(i), mutated(std::fs::read(family_root().join(FAMILY_FOLDERS[i]).join("config.json")).unwrap()))), act in prop::option::of(prop_oneof![Just(Activation::Gelu), Just(Activation::GeluTanh), Just(Activation::QuickGelu)]), size in prop::option::of(prop_oneof![0usize..80, Just(usize::MAX)])) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(family_root().join(FAMILY_FOLDERS[i]).join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        write(dir.path(), "config.json", &config);
        let opts = ImportOptions { act, new_classes: Some(3), input_size: size, ..ImportOptions::default() };
        if let Ok(ck) = load_any(dir.path(), &opts) {
            let _ = ck.import.unwrap().notices(ck.cfg.width);
        }
    }
}

// ---- the small parsers of flags ------------------------------------------

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn flag_parsers_of_any_text(s in "[ -~]{0,24}", t in prop_oneof![Just("kd=1,feature=0.5".to_string()), Just("0/4".to_string()), "[0-9/=,.a-z -]{0,16}"]) {
        for text in [&s, &t] {
            let _ = effrank_engine::sweep::jobs::Shard::parse(text);
            let _ = effrank_engine::train::LossSpec::parse(text, 0.5, 4.0, 0.0);
            let _ = text.parse::<effrank_engine::data::Normalize>();
            let _ = text.parse::<effrank_engine::factorize::FactorInit>();
            let _ = text.parse::<effrank_engine::device::Precision>();
            let _ = VitConfig::from_name_or_file(text, 10);
        }
    }
}
