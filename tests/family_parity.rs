//! Every ViT family and naming scheme against its library's own forward
//! (tests/fixtures/families/, written by scripts/make_family_fixtures.py):
//! timm hub folders of DeiT distilled, DeiT-III, DINOv2 (with and without
//! registers), CLIP (GELU and QuickGELU), average pooling and no q/k/v
//! bias; Hugging Face folders of DeiT (with and without teacher), Dinov2
//! (with and without registers, backbone and classifier) and
//! CLIPVisionModel. Each loads through `load_any` as the family the test
//! names and gives the library's logits at 32 px and, its position
//! embedding resampled, at 48 px (relative error at most 1e-4). The
//! backbones without a head (Dinov2Model, CLIPVisionModel) get a fresh one
//! that the test sets to the identity, so that their logits are the
//! library's pooled features.
//!
//! Then what must fail, fails clearly: a config.json that contradicts the
//! tensors, a LayerScale missing in one block, an architecture the engine
//! does not compute, and a flag that contradicts the folder. And what a
//! bare file cannot say (a CLIP's activation) is guessed out loud.

use effrank_engine::model::checkpoint::{Checkpoint, NamingScheme};
use effrank_engine::model::import::{load_any, ImportOptions, SaidBy};
use effrank_engine::model::{Family, Linear, Pool, PosEmbed};
use effrank_engine::ops::gelu::Activation;
use effrank_engine::testing::{cpu_logits, f32_tensors, rel_err};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const WIDTH: usize = 32;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

fn reference() -> HashMap<String, Vec<f32>> {
    f32_tensors(&fixture("reference.safetensors"))
}

fn at_size(size: Option<usize>) -> ImportOptions {
    ImportOptions {
        input_size: size,
        ..ImportOptions::default()
    }
}

/// A headless backbone with a fresh head of `WIDTH` classes set to the
/// identity: its logits are the pooled features.
fn identity_head(ck: &mut Checkpoint) {
    let mut eye = vec![0.0; WIDTH * WIDTH];
    for i in 0..WIDTH {
        eye[i * WIDTH + i] = 1.0;
    }
    ck.params.head = Linear::Dense {
        weight: eye,
        bias: Some(vec![0.0; WIDTH]),
    };
}

/// The checkpoint at `path` as `opts` say, with an identity head when it
/// is `headless`.
fn load(path: &Path, opts: &ImportOptions, headless: bool) -> Checkpoint {
    let opts = ImportOptions {
        new_classes: headless.then_some(WIDTH),
        ..opts.clone()
    };
    let mut ck = load_any(path, &opts).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    if headless {
        identity_head(&mut ck);
    }
    ck
}

/// The outputs of `path` at 32 and 48 px against the library's
/// `<output>_<reference>_<size>`; the checkpoint read at 32 px.
fn check_outputs(path: &Path, opts: &ImportOptions, reference_name: &str) -> Checkpoint {
    let r = reference();
    let headless = r.contains_key(&format!("features_{reference_name}_32"));
    let output = if headless { "features" } else { "logits" };
    let ck = load(path, opts, headless);
    let mut errors = Vec::new();
    for (size, ck) in [
        (32, ck.clone()),
        (
            48,
            load(
                path,
                &ImportOptions {
                    input_size: Some(48),
                    ..opts.clone()
                },
                headless,
            ),
        ),
    ] {
        assert_eq!(ck.cfg.image_size, size);
        let got = cpu_logits(&ck, &r[&format!("input{size}")]);
        let e = rel_err(&got, &r[&format!("{output}_{reference_name}_{size}")]);
        errors.push(format!("{size} px: {e:.1e}"));
        assert!(
            e <= 1e-4,
            "{reference_name}: {output} at {size} px differ from the library's by {e}"
        );
    }
    println!("{reference_name}: {}", errors.join(", "));
    ck
}

/// The fixture loads as the library's model and as `family` (with `ln_eps`).
fn parity(folder: &str, scheme: NamingScheme, family: Family, ln_eps: f32) {
    let ck = check_outputs(&fixture(folder), &ImportOptions::default(), folder);
    assert_eq!(ck.scheme, scheme, "{folder}");
    assert_eq!(ck.cfg.family, family, "{folder}");
    assert_eq!((ck.cfg.heads, ck.cfg.ln_eps), (2, ln_eps), "{folder}");
    let record = ck.import.unwrap();
    assert!(matches!(record.heads_from, SaidBy::Config(_)), "{folder}");
    assert!(matches!(record.act_from, SaidBy::Config(_)), "{folder}");
    assert!(record.notices(WIDTH).is_empty(), "{folder}");
}

fn plain() -> Family {
    Family::default()
}

fn layer_scale() -> Family {
    Family {
        layer_scale: true,
        ..plain()
    }
}

fn registers() -> Family {
    Family {
        registers: 4,
        pos_embed: PosEmbed::PatchesOnly,
        ..layer_scale()
    }
}

fn clip(act: Activation) -> Family {
    Family {
        norm_pre: true,
        patch_bias: false,
        act,
        ..plain()
    }
}

fn distilled() -> Family {
    Family {
        dist_token: true,
        pool: Pool::Distilled,
        ..plain()
    }
}

#[test]
fn timm_deit_distilled() {
    parity("timm_deit_distilled", NamingScheme::Timm, distilled(), 1e-6);
}

#[test]
fn timm_deit3() {
    let deit3 = Family {
        pos_embed: PosEmbed::PatchesOnly,
        ..layer_scale()
    };
    parity("timm_deit3", NamingScheme::Timm, deit3, 1e-6);
}

#[test]
fn timm_dinov2() {
    parity("timm_dinov2", NamingScheme::Timm, layer_scale(), 1e-6);
}

#[test]
fn timm_dinov2_with_registers() {
    parity("timm_dinov2_reg4", NamingScheme::Timm, registers(), 1e-6);
}

#[test]
fn timm_clip() {
    parity(
        "timm_clip",
        NamingScheme::Timm,
        clip(Activation::Gelu),
        1e-5,
    );
}

#[test]
fn timm_clip_quickgelu() {
    let family = clip(Activation::QuickGelu);
    parity("timm_clip_quickgelu", NamingScheme::Timm, family, 1e-5);
}

#[test]
fn timm_average_pooling_without_class_token() {
    let avg = Family {
        class_token: false,
        pool: Pool::Average,
        ..plain()
    };
    parity("timm_avg", NamingScheme::Timm, avg, 1e-6);
}

#[test]
fn timm_without_qkv_bias() {
    let no_bias = Family {
        qkv_bias: false,
        ..plain()
    };
    parity("timm_no_qkv_bias", NamingScheme::Timm, no_bias, 1e-6);
}

#[test]
fn hf_deit() {
    // The distillation token is in the sequence; the classifier reads the
    // class token only.
    let deit = Family {
        dist_token: true,
        ..plain()
    };
    parity("hf_deit", NamingScheme::HuggingFace, deit, 1e-12);
}

#[test]
fn hf_deit_with_teacher() {
    parity(
        "hf_deit_teacher",
        NamingScheme::HuggingFace,
        distilled(),
        1e-12,
    );
}

#[test]
fn hf_dinov2_backbone() {
    parity("hf_dinov2", NamingScheme::HuggingFace, layer_scale(), 1e-6);
}

#[test]
fn hf_dinov2_classifier() {
    let family = Family {
        pool: Pool::ClassAndMean,
        ..layer_scale()
    };
    parity("hf_dinov2_cls", NamingScheme::HuggingFace, family, 1e-6);
}

#[test]
fn hf_dinov2_with_registers_backbone() {
    parity(
        "hf_dinov2_reg",
        NamingScheme::HuggingFace,
        registers(),
        1e-6,
    );
}

#[test]
fn hf_dinov2_with_registers_classifier() {
    let family = Family {
        pool: Pool::ClassAndMean,
        ..registers()
    };
    parity("hf_dinov2_reg_cls", NamingScheme::HuggingFace, family, 1e-6);
}

#[test]
fn hf_clip_vision_model() {
    let family = clip(Activation::QuickGelu);
    parity("hf_clip", NamingScheme::HuggingFace, family, 1e-5);
}

// ---- files edited: renamed, bare, a tensor taken out ------------------------

/// The tensors of a fixture's model.safetensors, renamed by `rename`
/// (None drops one), written to `dir/name`.
fn rewritten(
    folder: &str,
    dir: &Path,
    name: &str,
    rename: impl Fn(&str) -> Option<String>,
) -> PathBuf {
    let bytes = std::fs::read(fixture(folder).join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect();
    let path = dir.join(name);
    safetensors::serialize_to_file(views, &None, &path).unwrap();
    path
}

/// A copy of a fixture folder, its config.json edited by `edit`.
fn edited(folder: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(folder).join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(fixture(folder).join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_error(path: &Path, opts: &ImportOptions) -> String {
    match load_any(path, opts) {
        Ok(ck) => panic!("{} loaded as {:?}", path.display(), ck.cfg),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_names(e: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(e.contains(w), "{w:?} not in: {e}");
    }
}

#[test]
fn clip_files_of_transformers_4_have_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefixed = rewritten("hf_clip", dir.path(), "model.safetensors", |k| {
        Some(format!("vision_model.{k}"))
    });
    std::fs::copy(
        fixture("hf_clip/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    check_outputs(prefixed.parent().unwrap(), &at_size(None), "hf_clip");
    let whole = rewritten("hf_clip", dir.path(), "model.safetensors", |k| {
        Some(if k.starts_with("encoder.layers.0.mlp") {
            format!("text_model.{k}")
        } else {
            format!("vision_model.{k}")
        })
    });
    let e = load_error(whole.parent().unwrap(), &at_size(None));
    assert_names(&e, &["text_model.", "CLIPVisionModel"]);
}

#[test]
fn a_bare_clip_file_says_its_activation_is_guessed_and_act_sets_it() {
    let dir = tempfile::tempdir().unwrap();
    let bare = rewritten("timm_clip_quickgelu", dir.path(), "w.safetensors", |k| {
        Some(k.to_string())
    });
    let guessed = load_any(
        &bare,
        &ImportOptions {
            heads: Some(2),
            ..at_size(None)
        },
    )
    .unwrap();
    assert_eq!(guessed.cfg.family.act, Activation::Gelu);
    assert_eq!(guessed.cfg.ln_eps, 1e-5);
    let record = guessed.import.unwrap();
    assert_eq!(record.act_from, SaidBy::Guessed);
    let notice = record.notices(WIDTH).join("\n");
    assert_names(&notice, &["w.safetensors", "--act", "quick-gelu"]);
    let flagged = ImportOptions {
        heads: Some(2),
        act: Some(Activation::QuickGelu),
        ..at_size(None)
    };
    let ck = check_outputs(&bare, &flagged, "timm_clip_quickgelu");
    let record = ck.import.unwrap();
    assert_eq!(record.act_from, SaidBy::Flag);
    // Only the normalization (not in a bare file) is still a guess.
    let notices = record.notices(WIDTH);
    assert!(
        notices.len() == 1 && notices[0].contains("--normalize"),
        "{notices:?}"
    );
    // A bare DINOv2 file: nothing about its activation is a guess.
    let dinov2 = rewritten("timm_dinov2", dir.path(), "d.safetensors", |k| {
        Some(k.into())
    });
    let ck = load_any(
        &dinov2,
        &ImportOptions {
            heads: Some(2),
            ..at_size(None)
        },
    )
    .unwrap();
    assert_eq!(ck.import.unwrap().act_from, SaidBy::Scheme);
}

#[test]
fn a_layer_scale_missing_in_one_block_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let timm = rewritten("timm_deit3", dir.path(), "model.safetensors", |k| {
        (k != "blocks.1.ls2.gamma").then(|| k.to_string())
    });
    std::fs::copy(
        fixture("timm_deit3/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let e = load_error(&timm, &at_size(None));
    assert_names(
        &e,
        &["model.safetensors", "blocks.1.ls2.gamma", "LayerScale"],
    );
    let hf = tempfile::tempdir().unwrap();
    let missing = "dinov2.encoder.layer.0.layer_scale1.lambda1";
    rewritten("hf_dinov2_cls", hf.path(), "model.safetensors", |k| {
        (k != missing).then(|| k.to_string())
    });
    std::fs::copy(
        fixture("hf_dinov2_cls/config.json"),
        hf.path().join("config.json"),
    )
    .unwrap();
    let e = load_error(hf.path(), &at_size(None));
    assert_names(&e, &["blocks.0.ls1.gamma", "layer_scale1.lambda1"]);
}

/// An edit of a config.json.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn a_config_that_contradicts_the_tensors_is_refused_naming_the_field() {
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "timm_deit3",
            Box::new(|c| c["model_args"]["no_embed_class"] = false.into()),
            &["model_args.no_embed_class", "patches only"],
        ),
        (
            "timm_clip",
            Box::new(|c| c["model_args"]["pre_norm"] = false.into()),
            &["model_args.pre_norm", "norm_pre"],
        ),
        (
            "timm_dinov2",
            Box::new(|c| c["model_args"]["init_values"] = serde_json::Value::Null),
            &["model_args.init_values", "LayerScale"],
        ),
        (
            "timm_avg",
            Box::new(|c| c["model_args"]["class_token"] = true.into()),
            &["model_args.class_token", "class token"],
        ),
        (
            "timm_dinov2_reg4",
            Box::new(|c| c["model_args"]["reg_tokens"] = 8.into()),
            &["model_args.reg_tokens", "registers 8", "registers 4"],
        ),
        (
            "timm_no_qkv_bias",
            Box::new(|c| {
                c["model_args"].as_object_mut().unwrap().remove("qkv_bias");
            }),
            &["architecture", "q, k, v biases"],
        ),
        (
            "hf_dinov2_reg",
            Box::new(|c| c["num_register_tokens"] = 2.into()),
            &["num_register_tokens", "registers 2"],
        ),
        (
            "hf_deit_teacher",
            Box::new(|c| c["architectures"] = serde_json::json!(["DeiTForImageClassification"])),
            &["architectures", "pooling Class", "Distilled"],
        ),
        (
            "hf_dinov2",
            Box::new(|c| c["qkv_bias"] = false.into()),
            &["qkv_bias", "q, k, v biases"],
        ),
        (
            "hf_dinov2",
            Box::new(|c| c["mlp_ratio"] = 4.into()),
            &["mlp_ratio", "MLP width 128"],
        ),
    ];
    for (folder, edit, wanted) in cases {
        let dir = edited(folder, edit);
        let e = load_error(dir.path(), &ImportOptions::default());
        assert_names(&e, &["config.json"]);
        assert_names(&e, wanted);
    }
}

#[test]
fn an_architecture_the_engine_does_not_compute_is_refused_by_name() {
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "hf_dinov2",
            Box::new(|c| c["use_swiglu_ffn"] = true.into()),
            &["use_swiglu_ffn", "SwiGLU"],
        ),
        (
            "hf_dinov2",
            Box::new(|c| {
                c["model_type"] = "vit".into();
                c.as_object_mut().unwrap().remove("architectures");
            }),
            &["model_type", "\"vit\"", "Dinov2"],
        ),
        (
            "hf_deit",
            Box::new(|c| c["architectures"] = serde_json::json!(["SwinForImageClassification"])),
            &["architectures", "SwinForImageClassification"],
        ),
        (
            "hf_clip",
            Box::new(|c| {
                c["model_type"] = "siglip_vision_model".into();
                c.as_object_mut().unwrap().remove("architectures");
            }),
            &["model_type", "siglip_vision_model"],
        ),
        (
            "hf_clip",
            Box::new(|c| {
                c["model_type"] = "clip".into();
                c.as_object_mut().unwrap().remove("architectures");
            }),
            &["model_type", "CLIPVisionModel"],
        ),
        (
            "hf_clip",
            Box::new(|c| c["hidden_act"] = "gelu_fast".into()),
            &["hidden_act", "gelu_fast"],
        ),
        (
            "timm_dinov2",
            Box::new(|c| c["architecture"] = "vit_giant_patch14_dinov2.lvd142m".into()),
            &["architecture", "vit_giant_patch14_dinov2", "SwiGLU"],
        ),
        (
            "timm_clip",
            Box::new(|c| c["architecture"] = "eva02_base_patch14_224.mim_in22k".into()),
            &["architecture", "eva02_base_patch14_224"],
        ),
        (
            "timm_clip",
            Box::new(|c| c["model_args"]["act_layer"] = "silu".into()),
            &["model_args.act_layer", "silu"],
        ),
        (
            "timm_avg",
            Box::new(|c| {
                c["global_pool"] = "map".into();
                c["model_args"]["global_pool"] = "map".into();
            }),
            &["global_pool", "map"],
        ),
    ];
    for (folder, edit, wanted) in cases {
        let dir = edited(folder, edit);
        let e = load_error(dir.path(), &ImportOptions::default());
        assert_names(&e, &["config.json"]);
        assert_names(&e, wanted);
    }
    // A SwiGLU Dinov2 file without its config.json, by its tensor names.
    let dir = tempfile::tempdir().unwrap();
    let swiglu = rewritten("hf_dinov2", dir.path(), "w.safetensors", |k| {
        Some(
            k.replace("mlp.fc1", "mlp.weights_in")
                .replace("mlp.fc2", "mlp.weights_out"),
        )
    });
    let e = load_error(&swiglu, &at_size(None));
    assert_names(&e, &["w.safetensors", "weights_in", "SwiGLU"]);
}

#[test]
fn a_flag_that_contradicts_the_folder_is_refused() {
    let opts = ImportOptions {
        act: Some(Activation::Gelu),
        new_classes: Some(WIDTH),
        ..ImportOptions::default()
    };
    let e = load_error(&fixture("hf_clip"), &opts);
    assert_names(&e, &["--act gelu", "hidden_act", "quick-gelu"]);
    let opts = ImportOptions {
        act: Some(Activation::QuickGelu),
        ..ImportOptions::default()
    };
    let e = load_error(&fixture("timm_clip"), &opts);
    assert_names(&e, &["--act quick-gelu", "architecture"]);
}

// ---- the input normalization each file implies -------------------------------

#[test]
fn each_file_says_its_normalization_or_its_family_guesses_it_aloud() {
    use effrank_engine::data::Normalize;
    for (folder, want, from) in [
        (
            "timm_dinov2",
            Normalize::Imagenet,
            "pretrained_cfg.mean and std",
        ),
        (
            "timm_deit_distilled",
            Normalize::Imagenet,
            "pretrained_cfg.mean",
        ),
        ("timm_clip", Normalize::Clip, "pretrained_cfg.mean"),
        ("timm_avg", Normalize::Half, "pretrained_cfg.mean"),
        (
            "hf_dinov2_reg",
            Normalize::Imagenet,
            "model_type = \"dinov2_with_registers\"",
        ),
        ("hf_deit", Normalize::Imagenet, "model_type = \"deit\""),
        (
            "hf_clip",
            Normalize::Clip,
            "model_type = \"clip_vision_model\"",
        ),
    ] {
        let opts = ImportOptions {
            new_classes: Some(3),
            ..at_size(None)
        };
        let ck = load_any(&fixture(folder), &opts).unwrap();
        let record = ck.import.unwrap();
        assert_eq!(record.normalize, Some(want), "{folder}");
        assert_names(
            record.normalize_from.as_deref().unwrap(),
            &["config.json", from],
        );
        assert!(
            !record
                .notices(WIDTH)
                .iter()
                .any(|n| n.contains("--normalize")),
            "{folder}: said by its config, not guessed"
        );
    }
    // A preprocessor_config.json beside a Hugging Face config wins.
    let dir = edited("hf_dinov2", |_| {});
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
    )
    .unwrap();
    let ck = load_any(
        dir.path(),
        &ImportOptions {
            new_classes: Some(3),
            ..at_size(None)
        },
    )
    .unwrap();
    let record = ck.import.unwrap();
    assert_eq!(record.normalize, Some(Normalize::Half));
    assert_names(
        record.normalize_from.as_deref().unwrap(),
        &["preprocessor_config.json", "image_mean"],
    );
    // Statistics the engine has no preset for are an error naming the fields.
    let odd = edited("timm_dinov2", |c| {
        c["pretrained_cfg"]["std"] = serde_json::json!([0.3, 0.3, 0.3])
    });
    let e = load_error(odd.path(), &at_size(None));
    assert_names(
        &e,
        &["config.json", "pretrained_cfg.mean and std", "imagenet"],
    );
    // A bare file of a family: guessed from the family, and said so.
    let bare_dir = tempfile::tempdir().unwrap();
    let bare = rewritten("timm_dinov2", bare_dir.path(), "d.safetensors", |k| {
        Some(k.to_string())
    });
    let ck = load_any(
        &bare,
        &ImportOptions {
            heads: Some(2),
            ..at_size(None)
        },
    )
    .unwrap();
    let record = ck.import.unwrap();
    assert_eq!(record.normalize, Some(Normalize::Imagenet));
    let notices = record.notices(WIDTH).join("\n");
    assert_names(
        &notices,
        &["d.safetensors", "normalization", "imagenet", "--normalize"],
    );
}
