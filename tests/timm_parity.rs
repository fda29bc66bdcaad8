//! Parity with PyTorch/timm: the same small ViT's weights in timm,
//! torchvision and Hugging Face names (tests/data/, written by
//! scripts/make_reference.py) load through the importers and give timm's
//! logits, loss and parameter gradients to 1e-4 relative error.

use effrank_engine::device::{Cpu, Device};
use effrank_engine::model::checkpoint::NamingScheme;
use effrank_engine::model::import::{load_any, ImportOptions};
use effrank_engine::model::params::param_specs;
use effrank_engine::model::{OutputGrads, Vit};
use effrank_engine::ops::loss::{logit_loss, LogitLossConfig, Logits, Outputs};
use effrank_engine::ops::Rows;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

struct Reference {
    f32s: HashMap<String, Vec<f32>>,
    labels: Vec<u32>,
}

fn reference() -> Reference {
    let bytes = std::fs::read(data("reference_io.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f32s = HashMap::new();
    let mut labels = Vec::new();
    for (name, view) in st.tensors() {
        if name == "labels" {
            labels = bytemuck::pod_collect_to_vec::<u8, i64>(view.data())
                .into_iter()
                .map(|v| v as u32)
                .collect();
        } else {
            f32s.insert(name, bytemuck::pod_collect_to_vec::<u8, f32>(view.data()));
        }
    }
    Reference { f32s, labels }
}

/// max |a − b| / max |b|
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn opts() -> ImportOptions {
    ImportOptions {
        heads: Some(4),
        ..ImportOptions::default()
    }
}

/// Logits of a checkpoint on the reference input; also returns the model.
fn logits_of(
    file: &str,
    r: &Reference,
) -> (Vec<f32>, Vit<Cpu>, effrank_engine::model::VitActs<Cpu>) {
    let be = Cpu;
    let ck = load_any(&data(file), &opts()).unwrap();
    let model = Vit::from_host(
        &be,
        &ck.cfg,
        &ck.ranks,
        &ck.params,
        effrank_engine::options::ModelPaths::default_of(&be),
    )
    .unwrap();
    let mut acts = model.new_acts(&be, 4).unwrap();
    be.write(&mut acts.images, &r.f32s["input"]).unwrap();
    model.forward(&be, &mut acts, 4).unwrap();
    (be.download(&acts.logits).unwrap(), model, acts)
}

#[test]
fn timm_logits_loss_and_gradients_match() {
    let be = Cpu;
    let r = reference();
    let ck = load_any(&data("timm_tiny.safetensors"), &opts()).unwrap();
    assert_eq!(ck.scheme, NamingScheme::Timm);
    assert_eq!(
        (
            ck.cfg.image_size,
            ck.cfg.patch,
            ck.cfg.width,
            ck.cfg.depth,
            ck.cfg.mlp,
            ck.cfg.classes
        ),
        (32, 8, 64, 2, 256, 10)
    );
    let (logits, model, acts) = logits_of("timm_tiny.safetensors", &r);
    let e = rel_err(&logits, &r.f32s["logits"]);
    assert!(e <= 1e-4, "logits differ from timm's: {e}");
    // The inference path (class-token rows only after the last attention).
    let mut frozen_acts = model.new_acts(&be, 4).unwrap();
    be.write(&mut frozen_acts.images, &r.f32s["input"]).unwrap();
    model.forward_logits(&be, &mut frozen_acts, 4).unwrap();
    let e = rel_err(
        &be.download(&frozen_acts.logits).unwrap(),
        &r.f32s["logits"],
    );
    assert!(
        e <= 1e-4,
        "logits-only forward differs from timm's logits: {e}"
    );

    let cfg = LogitLossConfig {
        ce_weight: 1.0,
        label_smoothing: 0.0,
        kd_weight: 0.0,
        temperature: 1.0,
        feature_weight: 0.0,
    };
    let mut d_logits = vec![0f32; 40];
    let mut loss = vec![0f32; 1];
    logit_loss(
        &be,
        Outputs {
            ds: &mut d_logits,
            loss: &mut loss,
        },
        Logits {
            student: &acts.logits,
            teacher: None,
            labels: &r.labels,
        },
        Rows::new(4, 10),
        &cfg,
        1.0,
    )
    .unwrap();
    let e = rel_err(&loss, &r.f32s["loss"]);
    assert!(e <= 1e-4, "loss {} vs timm {}", loss[0], r.f32s["loss"][0]);

    let mut grads = model.zeros_like(&be).unwrap();
    let mut scratch = model.new_scratch(&be, 4).unwrap();
    model
        .backward(
            &be,
            &acts,
            OutputGrads {
                logits: &d_logits,
                features: None,
            },
            &mut grads,
            &mut scratch,
            4,
        )
        .unwrap();
    let specs = param_specs(&model.cfg, &model.ranks);
    let by_name: HashMap<String, Vec<f32>> = specs
        .iter()
        .zip(grads.tensors())
        .map(|(s, g)| (s.name.clone(), g.clone()))
        .collect();
    let mut checked = 0;
    for (key, want) in r.f32s.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let got: Vec<f32> = if let Some(prefix) = name
            .strip_suffix(".qkv.weight")
            .or(name.strip_suffix(".qkv.bias"))
        {
            let suffix = if name.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            ["q", "k", "v"]
                .iter()
                .flat_map(|p| by_name[&format!("{prefix}.{p}.{suffix}")].clone())
                .collect()
        } else {
            by_name[name].clone()
        };
        let e = rel_err(&got, want);
        assert!(e <= 1e-4, "gradient of {name} differs from timm's: {e}");
        checked += 1;
    }
    assert!(
        checked >= 10,
        "only {checked} gradients in the reference file"
    );
}

#[test]
fn torchvision_names_give_the_same_model() {
    let r = reference();
    let ck = load_any(&data("torchvision_tiny.safetensors"), &opts()).unwrap();
    assert_eq!(ck.scheme, NamingScheme::Torchvision);
    let timm = load_any(&data("timm_tiny.safetensors"), &opts()).unwrap();
    assert_eq!(ck.params.tensors(), timm.params.tensors());
    let (logits, _, _) = logits_of("torchvision_tiny.safetensors", &r);
    assert!(rel_err(&logits, &r.f32s["logits"]) <= 1e-4);
}

#[test]
fn hugging_face_names_and_eps_give_hf_logits() {
    let r = reference();
    let ck = load_any(&data("hf_tiny.safetensors"), &opts()).unwrap();
    assert_eq!(ck.scheme, NamingScheme::HuggingFace);
    assert_eq!(ck.cfg.ln_eps, 1e-12);
    let (logits, _, _) = logits_of("hf_tiny.safetensors", &r);
    let e = rel_err(&logits, &r.f32s["logits_hf"]);
    assert!(e <= 1e-4, "HF logits differ: {e}");
}

#[test]
fn bf16_weights_load_close_to_f32() {
    let a = load_any(&data("timm_tiny.safetensors"), &opts()).unwrap();
    let b = load_any(&data("timm_tiny_bf16.safetensors"), &opts()).unwrap();
    for (x, y) in a.params.tensors().iter().zip(b.params.tensors()) {
        assert!(rel_err(y, x) <= 1e-2);
    }
}

#[test]
fn a_new_head_replaces_the_old_one() {
    let ck = load_any(
        &data("timm_tiny.safetensors"),
        &ImportOptions {
            heads: Some(4),
            new_classes: Some(3),
            ..ImportOptions::default()
        },
    )
    .unwrap();
    assert_eq!(ck.cfg.classes, 3);
    assert!(ck.params.head.bias().unwrap().iter().all(|&v| v == 0.0));
}

/// torchvision distributes its weights as a `.pth` (a `torch.save`d
/// state_dict): the same tiny weights as a `.pth` (scripts/make_pth_reference.py)
/// and as safetensors load to the same model, whose logits are equal bit
/// for bit, and match timm's.
#[test]
fn a_pytorch_checkpoint_gives_the_logits_of_its_safetensors_copy() {
    let r = reference();
    let pth = load_any(&data("torchvision_tiny.pth"), &opts()).unwrap();
    assert_eq!(pth.scheme, NamingScheme::Torchvision);
    let (from_pth, _, _) = logits_of("torchvision_tiny.pth", &r);
    let (from_safetensors, _, _) = logits_of("torchvision_tiny.safetensors", &r);
    let differing = from_pth
        .iter()
        .zip(&from_safetensors)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differing, 0,
        "{differing} logits differ between the .pth and its safetensors copy"
    );
    assert!(rel_err(&from_pth, &r.f32s["logits"]) <= 1e-4);
    // What cannot be read is an error naming the file, never executed.
    let e = format!(
        "{:#}",
        load_any(&data("pth_forbidden.pth"), &opts()).unwrap_err()
    );
    assert!(
        e.contains("pth_forbidden.pth") && e.contains("system"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        load_any(&data("pth_legacy.pt"), &opts()).unwrap_err()
    );
    assert!(e.contains("legacy"), "{e}");
}
