//! Bad checkpoints give errors that name the file, key and shapes; never a panic.

use effrank_engine::model::import::{load_any, ImportOptions};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn timm_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/timm_tiny.safetensors")
}

fn opts() -> ImportOptions {
    ImportOptions {
        heads: Some(4),
        ..ImportOptions::default()
    }
}

/// Rewrite the timm file with `edit` applied to its (name, dtype, shape, bytes) list.
fn rewrite(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> PathBuf {
    let bytes = std::fs::read(timm_file()).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let path = dir.join("edited.safetensors");
    std::fs::write(&path, safetensors::serialize(views, &None).unwrap()).unwrap();
    path
}

fn error_of(path: &Path) -> String {
    format!(
        "{:#}",
        load_any(path, &opts()).expect_err("loading should fail")
    )
}

#[test]
fn truncated_and_foreign_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(timm_file()).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(error_of(&cut).contains("cut.safetensors"));
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"{\"not\": \"safetensors\"}").unwrap();
    assert!(error_of(&junk).contains("junk.safetensors"));
    assert!(error_of(&dir.path().join("missing.safetensors")).contains("missing.safetensors"));
}

#[test]
fn missing_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = rewrite(dir.path(), |t| t.retain(|x| x.0 != "blocks.1.norm2.bias"));
    let e = error_of(&p);
    assert!(
        e.contains("missing tensor blocks.1.norm2.bias") && e.contains("[64]"),
        "{e}"
    );
}

#[test]
fn unexpected_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = rewrite(dir.path(), |t| {
        t.push((
            "blocks.0.extra.weight".into(),
            Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let e = error_of(&p);
    assert!(e.contains("unexpected tensor blocks.0.extra.weight"), "{e}");
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let p = rewrite(dir.path(), |t| {
        let x = t
            .iter_mut()
            .find(|x| x.0 == "blocks.0.mlp.fc2.bias")
            .unwrap();
        x.2 = vec![32, 2];
    });
    let e = error_of(&p);
    assert!(
        e.contains("blocks.0.mlp.fc2.bias") && e.contains("[32, 2]") && e.contains("[64]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = rewrite(dir.path(), |t| {
        let x = t.iter_mut().find(|x| x.0 == "head.bias").unwrap();
        x.1 = Dtype::I32;
    });
    let e = error_of(&p);
    assert!(e.contains("head.bias") && e.contains("I32"), "{e}");
}
