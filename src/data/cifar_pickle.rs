//! torchvision's CIFAR python folders (what `torchvision.datasets.CIFAR10`
//! and `CIFAR100` download and read).
//!
//! `cifar-10-batches-py/` holds `data_batch_1` .. `data_batch_5`,
//! `test_batch` and `batches.meta`; `cifar-100-python/` holds `train`,
//! `test` and `meta`. Each is a pickle (protocol 2, written by Python 2) of
//! a dict: a batch maps `data` to a `uint8` numpy array `[n, 3072]` (the R
//! plane, then G, then B, each 32x32 row-major: the same bytes as a record
//! of the binary files, so they are copied as they are) and `labels`
//! (CIFAR-10) or `fine_labels` (CIFAR-100) to a list of ints; the meta
//! file maps `label_names` / `fine_label_names` to the class names. The
//! pickles are run on the numpy layer (`formats::numpy_pickle`), which
//! executes nothing. Python 2 strings are bytes there; class names are
//! decoded as Latin-1, as torchvision does (`encoding='latin1'`).

use super::cifar::{CifarKind, PIXELS, SIDE};
use super::Dataset;
use crate::formats::numpy_pickle::{self, text, Value};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// Sub-folders, inside the given folder, where the python archives unpack.
pub const PYTHON_SUBFOLDERS: [&str; 2] = ["cifar-10-batches-py", "cifar-100-python"];

/// The file beside the batches that names the classes.
pub fn meta_file(kind: CifarKind) -> &'static str {
    match kind {
        CifarKind::Cifar10 => "batches.meta",
        CifarKind::Cifar100 => "meta",
    }
}

/// The batch key of the labels the engine uses (CIFAR-100: the fine ones).
fn labels_key(kind: CifarKind) -> &'static str {
    match kind {
        CifarKind::Cifar10 => "labels",
        CifarKind::Cifar100 => "fine_labels",
    }
}

/// The meta key of the class names.
fn names_key(kind: CifarKind) -> &'static str {
    match kind {
        CifarKind::Cifar10 => "label_names",
        CifarKind::Cifar100 => "fine_label_names",
    }
}

/// Read the batch pickles `files` (in that order) into one data set, with
/// the class names of `meta`.
pub fn load_files(kind: CifarKind, files: &[PathBuf], meta: &Path) -> Result<Dataset> {
    let names = parse_class_names(kind, meta, &read(kind, meta)?)?;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        // The file's bytes are dropped once unpickled: the array holds its own copy.
        let top = unpickle(path, &read(kind, path)?)?;
        append_batch(kind, path, &top, &mut images, &mut labels)?;
    }
    Dataset::new(images, labels, kind.classes(), Some(names), (3, SIDE, SIDE))
}

fn read(kind: CifarKind, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {} file {}", kind.name(), path.display()))
}

/// Append the images and labels of one batch pickle's bytes. `path` is
/// only for the messages.
pub fn parse_batch(
    kind: CifarKind,
    path: &Path,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    append_batch(kind, path, &unpickle(path, bytes)?, images, labels)
}

fn unpickle(path: &Path, bytes: &[u8]) -> Result<Value> {
    numpy_pickle::unpickle(bytes)
        .with_context(|| format!("{}: not a readable pickle", path.display()))
}

/// Append the images and labels of one unpickled batch, `top`.
fn append_batch(
    kind: CifarKind,
    path: &Path,
    top: &Value,
    images: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let at = |what: String| format!("{}: {what}", path.display());
    let key = labels_key(kind);
    let found = int_list(entry(top, key).map_err(|e| anyhow!(at(e.to_string())))?)
        .with_context(|| at(format!("key '{key}'")))?;
    let data = entry(top, "data").map_err(|e| anyhow!(at(e.to_string())))?;
    let Value::Object(obj) = data else {
        bail!(at(format!(
            "key 'data' holds {}, expected a numpy array",
            data.kind()
        )))
    };
    let array = obj
        .array()
        .ok_or_else(|| anyhow!(at(format!("key 'data' holds {}", data.kind()))))?;
    let pixels = array.as_u8().with_context(|| at("key 'data'".into()))?;
    let n = found.len();
    let shape_ok = array.shape == [n, PIXELS] || array.shape == [n, 3, SIDE, SIDE];
    ensure!(
        shape_ok,
        at(format!(
            "key 'data' has shape {:?}, expected [{n}, {PIXELS}] ({n} labels in '{key}', 3x32x32 planes each)",
            array.shape
        ))
    );
    for (i, &label) in found.iter().enumerate() {
        ensure!(
            (0..kind.classes() as i64).contains(&label),
            at(format!(
                "key '{key}' index {i} holds label {label}, but {} has {} classes",
                kind.name(),
                kind.classes()
            ))
        );
    }
    images.extend_from_slice(pixels);
    labels.extend(found.iter().map(|&l| l as u32));
    Ok(())
}

/// The class names of a meta pickle's bytes: exactly the kind's count.
pub fn parse_class_names(kind: CifarKind, path: &Path, bytes: &[u8]) -> Result<Vec<String>> {
    let at = |what: String| format!("{}: {what}", path.display());
    let top = unpickle(path, bytes)?;
    let key = names_key(kind);
    let list = entry(&top, key).map_err(|e| anyhow!(at(e.to_string())))?;
    let (Value::List(items) | Value::Tuple(items)) = list else {
        bail!(at(format!(
            "key '{key}' holds {}, expected a list of names",
            list.kind()
        )))
    };
    let names = items
        .items()
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Str(s) => Ok(s.to_string()),
            Value::Bytes(b) => Ok(b.iter().map(|&c| char::from(c)).collect()),
            other => bail!(at(format!("key '{key}' index {i} holds {}", other.kind()))),
        })
        .collect::<Result<Vec<String>>>()?;
    ensure!(
        names.len() == kind.classes(),
        at(format!(
            "key '{key}' names {} classes, {} has {}",
            names.len(),
            kind.name(),
            kind.classes()
        ))
    );
    Ok(names)
}

/// The value of `key` (a str, or a Python 2 str) in the dict `top`.
fn entry<'a>(top: &'a Value, key: &str) -> Result<&'a Value> {
    let Value::Dict(dict) = top else {
        bail!("holds {}, expected a dict", top.kind())
    };
    if let Some((_, v)) = dict.items().iter().find(|(k, _)| text(k) == Some(key)) {
        return Ok(v);
    }
    let keys: Vec<&str> = dict.items().iter().filter_map(|(k, _)| text(k)).collect();
    bail!("no key '{key}' (keys: {})", keys.join(", "))
}

/// A list of ints, or an integer numpy array of one dimension.
fn int_list(v: &Value) -> Result<Vec<i64>> {
    match v {
        Value::List(items) | Value::Tuple(items) => items
            .items()
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::Int(n) => Ok(*n),
                other => bail!("index {i} holds {}, expected an int", other.kind()),
            })
            .collect(),
        Value::Object(obj) => match obj.array() {
            Some(a) if a.shape.len() == 1 => a.to_i64(),
            _ => bail!("holds {}, expected a list of ints", v.kind()),
        },
        other => bail!("holds {}, expected a list of ints", other.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::pickle::writer::P;

    /// A batch pickle as the official files hold it: SHORT_BINSTRING keys,
    /// the labels as a list, the pixels as a `[n, 3072]` uint8 array.
    fn batch(kind: CifarKind, labels: &[u8], shape: &[usize]) -> Vec<u8> {
        let pixels: Vec<u8> = (0..labels.len() * PIXELS)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut p = P::new()
            .op(b"}(")
            .str2(labels_key(kind).as_bytes())
            .op(b"](");
        for &l in labels {
            p = p.op(&[b'K', l]);
        }
        p.op(b"e")
            .str2(b"data")
            .array(shape, "u1", "|", &pixels)
            .str2(b"batch_label")
            .str2(b"training batch 1 of 5")
            .op(b"u")
            .stop()
    }

    fn parse(kind: CifarKind, bytes: &[u8]) -> Result<(Vec<u8>, Vec<u32>)> {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        parse_batch(kind, Path::new("b"), bytes, &mut images, &mut labels)?;
        Ok((images, labels))
    }

    #[test]
    fn reads_both_batch_layouts() {
        let (images, labels) = parse(
            CifarKind::Cifar10,
            &batch(CifarKind::Cifar10, &[3, 9], &[2, PIXELS]),
        )
        .unwrap();
        assert_eq!(labels, [3, 9]);
        assert_eq!(images.len(), 2 * PIXELS);
        assert_eq!(images[PIXELS + 1], ((PIXELS + 1) % 253) as u8);
        let (_, labels) = parse(
            CifarKind::Cifar100,
            &batch(CifarKind::Cifar100, &[99], &[1, 3, SIDE, SIDE]),
        )
        .unwrap();
        assert_eq!(labels, [99]);
    }

    #[test]
    fn bad_batches_name_the_key_at_fault() {
        let e = format!(
            "{:#}",
            parse(
                CifarKind::Cifar10,
                &batch(CifarKind::Cifar10, &[10], &[1, PIXELS])
            )
            .unwrap_err()
        );
        assert!(
            e.contains("b: key 'labels' index 0 holds label 10, but CIFAR-10 has 10 classes"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse(
                CifarKind::Cifar10,
                &batch(CifarKind::Cifar10, &[1, 2], &[2, 32, 32, 3])
            )
            .unwrap_err()
        );
        assert!(
            e.contains("key 'data' has shape [2, 32, 32, 3], expected [2, 3072]"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            parse(
                CifarKind::Cifar100,
                &batch(CifarKind::Cifar10, &[1], &[1, PIXELS])
            )
            .unwrap_err()
        );
        assert!(
            e.contains("b: no key 'fine_labels' (keys: labels, data, batch_label)"),
            "{e}"
        );
        let names = P::new()
            .op(b"}")
            .str2(b"label_names")
            .op(b"](")
            .str2(b"cat")
            .op(b"es")
            .stop();
        let e = parse_class_names(CifarKind::Cifar10, Path::new("m"), &names)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m: key 'label_names' names 1 classes, CIFAR-10 has 10"),
            "{e}"
        );
    }
}
