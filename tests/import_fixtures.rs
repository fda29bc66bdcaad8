//! Hub folders, the heads rule and input-size resampling against each
//! library's own forward (tests/fixtures/import/, written by
//! scripts/make_import_fixtures.py): a transformers ViTForImageClassification
//! and a timm ViT as their hub folders, a torchvision VisionTransformer as a
//! bare file, each of width 64 and 2 heads (which width / 64 would take for
//! 1), at 32 px and resampled to 48 px.

use effrank_engine::model::checkpoint::{Checkpoint, NamingScheme};
use effrank_engine::model::import::{load_any, torchvision_heads, ImportOptions, SaidBy};
use effrank_engine::model::resample::{bicubic_resize_hwc, GridResize};
use effrank_engine::testing::{cpu_logits, f32_tensors, rel_err};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
}

fn reference() -> HashMap<String, Vec<f32>> {
    f32_tensors(&fixture("reference.safetensors"))
}

fn at_size(size: Option<usize>, heads: Option<usize>) -> ImportOptions {
    ImportOptions {
        heads,
        input_size: size,
        ..ImportOptions::default()
    }
}

/// The checkpoint's logits at 32 px and resampled to 48 px against the
/// library's own.
fn check_parity(path: &Path, heads: Option<usize>, lib: &str) -> Checkpoint {
    let r = reference();
    let ck = load_any(path, &at_size(None, heads)).unwrap();
    let e = rel_err(
        &cpu_logits(&ck, &r["input32"]),
        &r[&format!("logits_{lib}_32")],
    );
    assert!(e <= 1e-4, "{lib} logits at 32 px differ: {e}");
    let big = load_any(path, &at_size(Some(48), heads)).unwrap();
    assert_eq!(big.cfg.image_size, 48);
    let resample = big.import.as_ref().unwrap().input_size.clone().unwrap();
    assert_eq!((resample.from, resample.to), (32, 48));
    let e = rel_err(
        &cpu_logits(&big, &r["input48"]),
        &r[&format!("logits_{lib}_48")],
    );
    assert!(e <= 1e-4, "{lib} logits at 48 px (resampled) differ: {e}");
    ck
}

#[test]
fn the_resampler_is_torchs_bicubic() {
    let r = reference();
    for n in [2, 3, 6, 7] {
        for (antialias, tag) in [(true, "aa"), (false, "plain")] {
            let got = bicubic_resize_hwc(
                &r["resample_src"],
                3,
                GridResize { from: 4, to: n },
                antialias,
            )
            .unwrap();
            let e = rel_err(&got, &r[&format!("resample_{tag}_{n}")]);
            assert!(e <= 1e-5, "4 -> {n}, antialias {antialias}: {e}");
        }
    }
}

#[test]
fn a_hugging_face_hub_folder_is_a_checkpoint() {
    let ck = check_parity(&fixture("hf_vit"), None, "hf");
    assert_eq!(ck.scheme, NamingScheme::HuggingFace);
    assert_eq!((ck.cfg.heads, ck.cfg.ln_eps), (2, 1e-12));
    let record = ck.import.unwrap();
    assert_eq!(
        record.heads_from,
        SaidBy::Config("num_attention_heads".into())
    );
    assert_eq!(
        record.class_names.clone().unwrap(),
        ["cat", "dog", "fox", "owl", "yak"]
    );
    assert!(record.notices(64).is_empty());
}

#[test]
fn a_timm_hub_folder_is_a_checkpoint() {
    let ck = check_parity(&fixture("timm_vit"), None, "timm");
    assert_eq!((ck.scheme, ck.cfg.heads), (NamingScheme::Timm, 2));
    let record = ck.import.unwrap();
    assert_eq!(
        record.heads_from,
        SaidBy::Config("model_args.num_heads".into())
    );
    assert_eq!(record.architecture.unwrap(), "vit_tiny_patch16_224");
}

#[test]
fn a_bare_file_with_unknown_heads_says_so_and_heads_sets_them() {
    let path = fixture("torchvision_vit.safetensors");
    let guessed = load_any(&path, &at_size(None, None)).unwrap();
    let record = guessed.import.unwrap();
    assert_eq!(
        (record.heads, record.heads_from.clone()),
        (1, SaidBy::Guessed)
    );
    let notice = record.notices(64).join("\n");
    assert!(
        notice.contains("--heads") && notice.contains("torchvision_vit"),
        "{notice}"
    );
    let ck = check_parity(&path, Some(2), "torchvision");
    assert_eq!(ck.import.unwrap().heads_from, SaidBy::Flag);
    // The same weights of the Hugging Face folder, without its config.json.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("hf_vit/model.safetensors"),
        dir.path().join("w.safetensors"),
    )
    .unwrap();
    let bare = load_any(&dir.path().join("w.safetensors"), &at_size(None, None)).unwrap();
    assert_eq!(bare.import.unwrap().heads_from, SaidBy::Guessed);
}

#[test]
fn torchvisions_architectures_fix_their_heads() {
    assert_eq!(torchvision_heads(1280, 32, 5120), Some(("vit_h_14", 16)));
    assert_eq!(torchvision_heads(768, 12, 3072).unwrap().1, 12);
    assert_eq!(torchvision_heads(1024, 24, 4096).unwrap().1, 16);
    assert_eq!(torchvision_heads(64, 1, 64), None);
}

/// A copy of a fixture folder with its config.json edited by `edit`.
fn edited(folder: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(&format!("{folder}/model.safetensors")),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(fixture(&format!("{folder}/config.json"))).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_error(dir: &Path, opts: &ImportOptions) -> String {
    format!("{:#}", load_any(dir, opts).unwrap_err())
}

/// An edit of a config.json.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn a_config_that_contradicts_the_tensors_or_names_another_model_is_refused() {
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "hf_vit",
            Box::new(|c| c["num_hidden_layers"] = 3.into()),
            &["num_hidden_layers", "depth 3", "depth 1"],
        ),
        (
            "hf_vit",
            Box::new(|c| c["image_size"] = 64.into()),
            &["image_size", "input size 64"],
        ),
        (
            "hf_vit",
            Box::new(|c| c["architectures"] = serde_json::json!(["DeiTForImageClassification"])),
            &["architectures", "DeiTForImageClassification"],
        ),
        (
            "hf_vit",
            Box::new(|c| c["model_type"] = "dinov2".into()),
            &["model_type", "dinov2"],
        ),
        (
            "hf_vit",
            Box::new(|c| c["hidden_act"] = "relu".into()),
            &["hidden_act", "relu"],
        ),
        (
            "hf_vit",
            Box::new(|c| c["num_attention_heads"] = 3.into()),
            &["heads 3", "num_attention_heads"],
        ),
        (
            "timm_vit",
            Box::new(|c| c["architecture"] = "vit_small_patch14_dinov2.lvd142m".into()),
            &["architecture", "vit_small_patch14_dinov2"],
        ),
        (
            "timm_vit",
            Box::new(|c| c["model_args"]["embed_dim"] = 96.into()),
            &["model_args.embed_dim", "width 96"],
        ),
        (
            "timm_vit",
            Box::new(|c| c["model_args"]["init_values"] = 1e-5.into()),
            &["model_args.init_values"],
        ),
        (
            "timm_vit",
            Box::new(|c| c["global_pool"] = "avg".into()),
            &["global_pool", "avg"],
        ),
        (
            "timm_vit",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("model_args");
            }),
            &["architecture", "width 192"],
        ),
    ];
    for (folder, edit, wanted) in cases {
        let dir = edited(folder, edit);
        let e = load_error(dir.path(), &ImportOptions::default());
        assert!(e.contains("config.json"), "no file named: {e}");
        for w in wanted {
            assert!(e.contains(w), "{w:?} not in: {e}");
        }
    }
}

#[test]
fn flags_that_contradict_the_folder_or_the_patch_are_refused() {
    let e = load_error(&fixture("hf_vit"), &at_size(None, Some(4)));
    assert!(
        e.contains("--heads 4") && e.contains("num_attention_heads"),
        "{e}"
    );
    let e = load_error(&fixture("hf_vit"), &at_size(Some(50), None));
    assert!(
        e.contains("--input-size 50") && e.contains("multiple of 8"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let e = load_error(dir.path(), &ImportOptions::default());
    assert!(e.contains("without a config.json"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let e = load_error(dir.path(), &ImportOptions::default());
    assert!(e.contains("no model.safetensors"), "{e}");
    // timm weights beside a Hugging Face config.
    let mixed = edited("hf_vit", |_| {});
    std::fs::copy(
        fixture("timm_vit/model.safetensors"),
        mixed.path().join("model.safetensors"),
    )
    .unwrap();
    let e = load_error(mixed.path(), &ImportOptions::default());
    assert!(e.contains("config.json") && e.contains("Timm"), "{e}");
}
