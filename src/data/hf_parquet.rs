//! Hugging Face datasets saved as parquet (the hub's `data/` layout,
//! `data/train-00000-of-00001.parquet`, or any folder of `*.parquet` files
//! named by split).
//!
//! `datasets` writes an image column as a struct `{bytes: binary, path:
//! string}` holding the encoded file (PNG, JPEG), a label column as an
//! int, and the features (which column is a `ClassLabel` and its `names`)
//! as JSON under the schema's key-value metadata `huggingface`
//! (`{"info": {"features": {"label": {"_type": "ClassLabel", "names":
//! [...]}}}}`). The image column is the struct column with a `bytes`
//! field, the label column the int column named `label`, `labels` or
//! `fine_label`, else the only `ClassLabel`; either can be named instead
//! (`ColumnChoice`). Every image is decoded with the `image` crate,
//! converted to RGB and resized to the stored size exactly as an image
//! folder's are (`folder`), in parallel; or, when the decoded splits
//! would exceed the data memory budget, streamed: the encoded images (the
//! files' own bytes, usually far smaller than the pixels at the model's
//! size) are held and decoded per batch (`stream`).
//!
//! The class count is the number of `ClassLabel` names; without names it
//! is one more than the largest training label, and the summary says so.
//! Read: uncompressed and snappy-compressed files (pyarrow's default, which
//! `datasets` uses); another codec is an error naming it and the file.

use super::stream::{self, decode_into, EncodedImages, Streamed};
use super::Dataset;
use anyhow::{anyhow, bail, ensure, Context, Result};
use parquet::basic::{Compression, Type as Physical};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::{Type, TypePtr};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Names of an int column taken as the labels when no flag names one.
pub const LABEL_NAMES: [&str; 3] = ["label", "labels", "fine_label"];

/// The image and label columns as the user named them (None: detected).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ColumnChoice {
    pub image: Option<String>,
    pub label: Option<String>,
}

/// Both splits, read.
#[derive(Debug)]
pub struct ParquetData {
    pub train: Dataset,
    pub test: Dataset,
    /// The columns read and where the class count came from, for the summary.
    pub description: String,
}

/// Read the training files and the test files, each list in order, every
/// image resized to `size` x `size`; streamed when both splits decoded
/// would take more than `budget` bytes.
pub fn load(
    train: &[PathBuf],
    test: &[PathBuf],
    choice: &ColumnChoice,
    size: usize,
    budget: Option<u64>,
) -> Result<ParquetData> {
    ensure!(size > 0, "image size must be at least 1 pixel");
    let first = train
        .first()
        .ok_or_else(|| anyhow!("no training parquet files"))?;
    let columns = Columns::detect(&open(first)?, first, choice)?;
    // Files larger than the budget hold more encoded images than memory
    // should: those are spilled to a temporary file as they are read.
    let mut on_disk = 0;
    for path in train.iter().chain(test) {
        on_disk += std::fs::metadata(path)
            .with_context(|| format!("opening {}", path.display()))?
            .len();
    }
    let spill = budget.is_some_and(|b| on_disk > b);
    let train_rows = read_files(train, &columns, spill)?;
    let test_rows = read_files(test, &columns, spill)?;
    let (classes, counted) = match &train_rows.names {
        Some(names) => (names.len(), "ClassLabel names"),
        None => (train_rows.max_label() + 1, "largest training label + 1"),
    };
    if let (Some(a), Some(b)) = (&train_rows.names, &test_rows.names) {
        ensure!(
            a == b,
            "the test files' ClassLabel names for column '{}' differ from the training files' ({} names vs {})",
            columns.label,
            b.len(),
            a.len()
        );
    }
    let decoded = (train_rows.rows.len() + test_rows.rows.len()) as u64 * 3 * (size as u64).pow(2);
    let stream_budget = budget.filter(|&b| decoded > b);
    let description = format!(
        "image column '{}', label column '{}', {classes} classes ({counted}){}",
        columns.image,
        columns.label,
        match stream_budget {
            Some(_) => format!(
                "; streamed: {} MiB decoded exceeds the data memory budget{}",
                decoded >> 20,
                if spill {
                    ", and so do the files: their images are read back from a temporary file"
                } else {
                    ""
                }
            ),
            None => String::new(),
        }
    );
    let split = |rows: Rows| match stream_budget {
        Some(budget) => rows.stream(&columns, classes, size, budget),
        None => rows.decode(&columns, classes, size),
    };
    Ok(ParquetData {
        train: split(train_rows)?,
        test: split(test_rows)?,
        description,
    })
}

fn open(path: &Path) -> Result<SerializedFileReader<std::fs::File>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))
}

/// The two columns read, as schema fields.
struct Columns {
    image: String,
    label: String,
}

impl Columns {
    /// The columns `choice` names, else the detected ones, in `reader`'s schema.
    fn detect(
        reader: &SerializedFileReader<std::fs::File>,
        path: &Path,
        choice: &ColumnChoice,
    ) -> Result<Columns> {
        let fields = top_fields(reader);
        let listing = || {
            fields
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let image = match &choice.image {
            Some(name) => name.clone(),
            None => {
                let found: Vec<&str> = fields
                    .iter()
                    .filter(|f| is_image_struct(f))
                    .map(|f| f.name())
                    .collect();
                match found[..] {
                    [one] => one.to_string(),
                    [] => bail!(
                        "{}: no image column (a struct column with a 'bytes' field, as datasets writes an Image feature); columns: {}",
                        path.display(),
                        listing()
                    ),
                    _ => bail!(
                        "{}: several image columns ({}); name one with --image-column",
                        path.display(),
                        found.join(", ")
                    ),
                }
            }
        };
        let label = match &choice.label {
            Some(name) => name.clone(),
            None => detect_label(&fields, &features(reader, path)?, path, &listing())?,
        };
        Ok(Columns { image, label })
    }
}

fn top_fields(reader: &SerializedFileReader<std::fs::File>) -> Vec<TypePtr> {
    reader
        .metadata()
        .file_metadata()
        .schema()
        .get_fields()
        .to_vec()
}

fn is_image_struct(field: &Type) -> bool {
    field.is_group() && field.get_fields().iter().any(|f| f.name() == "bytes")
}

fn is_int(field: &Type) -> bool {
    field.is_primitive() && matches!(field.get_physical_type(), Physical::INT32 | Physical::INT64)
}

/// An int column named like a label, else the only int `ClassLabel`.
fn detect_label(
    fields: &[TypePtr],
    features: &serde_json::Value,
    path: &Path,
    listing: &str,
) -> Result<String> {
    let named: Vec<&str> = fields
        .iter()
        .filter(|f| is_int(f) && LABEL_NAMES.contains(&f.name()))
        .map(|f| f.name())
        .collect();
    let class_labels: Vec<&str> = fields
        .iter()
        .filter(|f| is_int(f) && features[f.name()]["_type"] == "ClassLabel")
        .map(|f| f.name())
        .collect();
    match (&named[..], &class_labels[..]) {
        ([one], _) | ([], [one]) => Ok(one.to_string()),
        ([], []) => bail!(
            "{}: no label column (an int column named {} or the only ClassLabel); columns: {listing}; name one with --label-column",
            path.display(),
            LABEL_NAMES.join(", ")
        ),
        ([], several) | (several, _) => bail!(
            "{}: several label columns ({}); name one with --label-column",
            path.display(),
            several.join(", ")
        ),
    }
}

/// The `features` object of the file's `huggingface` metadata (JSON null
/// when the file has none).
fn features(
    reader: &SerializedFileReader<std::fs::File>,
    path: &Path,
) -> Result<serde_json::Value> {
    let kv = reader.metadata().file_metadata().key_value_metadata();
    let Some(json) = kv
        .into_iter()
        .flatten()
        .find(|kv| kv.key == "huggingface")
        .and_then(|kv| kv.value.as_deref())
    else {
        return Ok(serde_json::Value::Null);
    };
    let meta: serde_json::Value = serde_json::from_str(json)
        .with_context(|| format!("{}: metadata key 'huggingface' is not JSON", path.display()))?;
    Ok(meta["info"]["features"].clone())
}

/// The `ClassLabel` names of `column`, if the features give them.
fn class_names(
    features: &serde_json::Value,
    column: &str,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    let feature = &features[column];
    if feature["_type"] != "ClassLabel" {
        return Ok(None);
    }
    let names = feature["names"].as_array().ok_or_else(|| {
        anyhow!(
            "{}: metadata 'huggingface': ClassLabel '{column}' has no names list",
            path.display()
        )
    })?;
    let names = names
        .iter()
        .map(|n| n.as_str().map(String::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            anyhow!(
                "{}: metadata 'huggingface': ClassLabel '{column}' has a name that is not a string",
                path.display()
            )
        })?;
    ensure!(
        !names.is_empty(),
        "{}: metadata 'huggingface': ClassLabel '{column}' has no names",
        path.display()
    );
    Ok(Some(names))
}

/// One row's label, with where it came from (its image is in the
/// split's `ImageStore`, at the same index).
struct RawRow {
    label: i64,
    file: usize,
    row: usize,
}

/// The rows of one split's files, not yet decoded.
struct Rows {
    files: Vec<PathBuf>,
    rows: Vec<RawRow>,
    store: ImageStore,
    /// The ClassLabel names (the same in every file).
    names: Option<Vec<String>>,
}

impl Rows {
    fn max_label(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.label.max(0) as usize)
            .max()
            .unwrap_or(0)
    }

    fn at(&self, r: &RawRow, column: &str) -> String {
        format!(
            "{}: row {} column '{column}'",
            self.files[r.file].display(),
            r.row
        )
    }

    fn check_labels(&self, columns: &Columns, classes: usize) -> Result<()> {
        for r in &self.rows {
            ensure!(
                r.label >= 0 && (r.label as u64) < classes as u64,
                "{}: label {} is out of range for {classes} classes",
                self.at(r, &columns.label),
                r.label
            );
        }
        Ok(())
    }

    /// Check every label against `classes` and decode every image.
    fn decode(self, columns: &Columns, classes: usize, size: usize) -> Result<Dataset> {
        self.check_labels(columns, classes)?;
        let n = 3 * size * size;
        let mut images = vec![0u8; self.rows.len() * n];
        images
            .par_chunks_mut(n)
            .zip(self.rows.par_iter().enumerate())
            .try_for_each(|(out, (i, r))| {
                let at = self.at(r, &columns.image);
                decode_into(&self.store.get(i)?, &at, size, out)
                    .with_context(|| format!("{at}: not a readable image"))
            })?;
        let labels = self.rows.iter().map(|r| r.label as u32).collect();
        Dataset::new(images, labels, classes, self.names, (3, size, size))
    }

    /// Check every label, keep the encoded images, and decode each once to
    /// check it and to fingerprint the split as its decoded copy would be.
    fn stream(
        self,
        columns: &Columns,
        classes: usize,
        size: usize,
        budget: u64,
    ) -> Result<Dataset> {
        self.check_labels(columns, classes)?;
        let labels: Vec<u32> = self.rows.iter().map(|r| r.label as u32).collect();
        let encoded = EncodedRows {
            at: self.rows.iter().map(|r| (r.file, r.row)).collect(),
            store: self.store,
            files: self.files,
            column: columns.image.clone(),
        };
        let source: Arc<dyn EncodedImages> = Arc::new(encoded);
        let mut data = Dataset::streamed(
            Streamed {
                items: (0..source.len()).collect(),
                source,
                side: size,
                budget,
                fingerprint: String::new(),
            },
            labels,
            classes,
            self.names,
        )?;
        let fingerprint = stream::fingerprint_streamed(&data)?;
        if let Some(s) = data.stream.as_mut() {
            s.fingerprint = fingerprint;
        }
        Ok(data)
    }
}

/// The encoded images of a streamed split, each named by its file and row.
#[derive(Debug)]
struct EncodedRows {
    store: ImageStore,
    at: Vec<(usize, usize)>,
    files: Vec<PathBuf>,
    column: String,
}

impl EncodedImages for EncodedRows {
    fn len(&self) -> usize {
        self.store.len()
    }
    fn encoded(&self, i: usize) -> Result<Vec<u8>> {
        self.store.get(i)
    }
    fn name(&self, i: usize) -> String {
        let (file, row) = self.at[i];
        format!(
            "{}: row {row} column '{}'",
            self.files[file].display(),
            self.column
        )
    }
    fn held_bytes(&self) -> u64 {
        self.store.held_bytes() + 16 * self.at.len() as u64
    }
}

/// The encoded images of one split, in the order read, image `i` ending
/// at `ends[i]`: in memory, or, for files larger than the data memory
/// budget, in an unnamed temporary file (in `$TMPDIR`; the system removes
/// it when the process ends, however it ends), read back per image.
#[derive(Debug)]
struct ImageStore {
    place: StorePlace,
    ends: Vec<u64>,
}

#[derive(Debug)]
enum StorePlace {
    Memory(Vec<u8>),
    /// Being written, while the files are read.
    Spilling(std::io::BufWriter<std::fs::File>),
    Spilled(std::fs::File),
}

impl ImageStore {
    fn new(spill: bool) -> Result<Self> {
        let place = if spill {
            let file = tempfile::tempfile().context(
                "creating a temporary file for parquet images larger than the data memory budget",
            )?;
            StorePlace::Spilling(std::io::BufWriter::new(file))
        } else {
            StorePlace::Memory(Vec::new())
        };
        Ok(ImageStore {
            place,
            ends: Vec::new(),
        })
    }

    fn push(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        match &mut self.place {
            StorePlace::Memory(v) => v.extend_from_slice(bytes),
            StorePlace::Spilling(w) => w
                .write_all(bytes)
                .context("writing parquet images to a temporary file")?,
            StorePlace::Spilled(_) => bail!("parquet image store already finished"),
        }
        let end = self.ends.last().copied().unwrap_or(0) + bytes.len() as u64;
        self.ends.push(end);
        Ok(())
    }

    /// Done writing: a spill file is flushed and read from then on.
    fn finish(&mut self) -> Result<()> {
        let place = std::mem::replace(&mut self.place, StorePlace::Memory(Vec::new()));
        self.place = match place {
            StorePlace::Spilling(w) => StorePlace::Spilled(
                w.into_inner()
                    .map_err(|e| e.into_error())
                    .context("writing parquet images to a temporary file")?,
            ),
            other => other,
        };
        Ok(())
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn get(&self, i: usize) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        let end = self.ends[i];
        match &self.place {
            StorePlace::Memory(v) => Ok(v[start as usize..end as usize].to_vec()),
            StorePlace::Spilled(f) => {
                let mut buf = vec![0u8; (end - start) as usize];
                f.read_exact_at(&mut buf, start)
                    .context("reading parquet images back from their temporary file")?;
                Ok(buf)
            }
            StorePlace::Spilling(_) => bail!("parquet image store read before it was finished"),
        }
    }

    fn held_bytes(&self) -> u64 {
        let images = match &self.place {
            StorePlace::Memory(v) => v.len() as u64,
            _ => 0,
        };
        images + 8 * self.ends.len() as u64
    }
}

/// Every row of `files`: the image bytes and the label of `columns`, the
/// images spilled to a temporary file when `spill`.
fn read_files(files: &[PathBuf], columns: &Columns, spill: bool) -> Result<Rows> {
    let mut rows = Vec::new();
    let mut store = ImageStore::new(spill)?;
    let mut names: Option<Option<Vec<String>>> = None;
    for (i, path) in files.iter().enumerate() {
        let reader = open(path)?;
        let file_names = class_names(&features(&reader, path)?, &columns.label, path)?;
        match &names {
            None => names = Some(file_names),
            Some(first) => ensure!(
                *first == file_names,
                "{}: ClassLabel names of column '{}' differ from those of {}",
                path.display(),
                columns.label,
                files[0].display()
            ),
        }
        read_rows(&reader, path, columns, i, &mut rows, &mut store)?;
    }
    store.finish()?;
    Ok(Rows {
        files: files.to_vec(),
        rows,
        store,
        names: names.flatten(),
    })
}

fn read_rows(
    reader: &SerializedFileReader<std::fs::File>,
    path: &Path,
    columns: &Columns,
    file: usize,
    rows: &mut Vec<RawRow>,
    store: &mut ImageStore,
) -> Result<()> {
    check_codecs(reader, path)?;
    let fields = top_fields(reader);
    let pick = |name: &str, what: &str| -> Result<TypePtr> {
        fields
            .iter()
            .find(|f| f.name() == name)
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "{}: no {what} column '{name}'; columns: {}",
                    path.display(),
                    fields
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    };
    let image = pick(&columns.image, "image")?;
    let label = pick(&columns.label, "label")?;
    ensure!(
        is_int(&label),
        "{}: label column '{}' is not an int column",
        path.display(),
        columns.label
    );
    let projection = Type::group_type_builder("schema")
        .with_fields(vec![image, label])
        .build()?;
    let iter = reader.get_row_iter(Some(projection)).with_context(|| {
        format!(
            "{}: reading columns '{}' and '{}'",
            path.display(),
            columns.image,
            columns.label
        )
    })?;
    for (row, record) in iter.enumerate() {
        let at = |column: &str| format!("{}: row {row} column '{column}'", path.display());
        let record = record.with_context(|| format!("{}: reading row {row}", path.display()))?;
        let (mut bytes, mut label) = (None, None);
        for (name, field) in record.get_column_iter() {
            if *name == columns.image {
                bytes = Some(image_bytes(field).with_context(|| at(&columns.image))?);
            } else if *name == columns.label {
                label = Some(int_value(field).with_context(|| at(&columns.label))?);
            }
        }
        let (Some(bytes), Some(label)) = (bytes, label) else {
            bail!(
                "{}: row {row} lacks column '{}' or '{}'",
                path.display(),
                columns.image,
                columns.label
            )
        };
        store.push(&bytes)?;
        rows.push(RawRow { label, file, row });
    }
    Ok(())
}

/// Only the codecs compiled in (see Cargo.toml).
fn check_codecs(reader: &SerializedFileReader<std::fs::File>, path: &Path) -> Result<()> {
    for group in reader.metadata().row_groups() {
        for column in group.columns() {
            let codec = column.compression();
            ensure!(
                matches!(codec, Compression::UNCOMPRESSED | Compression::SNAPPY),
                "{}: column '{}' is compressed with {codec}, which is not read (snappy, pyarrow's default, and uncompressed are)",
                path.display(),
                column.column_path()
            );
        }
    }
    Ok(())
}

/// The encoded image of a `{bytes, path}` struct (or of a binary column).
fn image_bytes(field: &Field) -> Result<Vec<u8>> {
    match field {
        Field::Bytes(b) => Ok(b.data().to_vec()),
        Field::Group(row) => {
            let mut path = None;
            for (name, f) in row.get_column_iter() {
                match (name.as_str(), f) {
                    ("bytes", Field::Bytes(b)) => return Ok(b.data().to_vec()),
                    ("path", Field::Str(p)) => path = Some(p.clone()),
                    _ => {}
                }
            }
            bail!(
                "the image has no bytes (path {}); only images stored in the file are read",
                path.as_deref().unwrap_or("none")
            )
        }
        Field::Null => bail!("the image is null"),
        other => bail!("holds {other}, expected an image struct {{bytes, path}}"),
    }
}

fn int_value(field: &Field) -> Result<i64> {
    Ok(match field {
        Field::Byte(v) => (*v).into(),
        Field::Short(v) => (*v).into(),
        Field::Int(v) => (*v).into(),
        Field::Long(v) => *v,
        Field::UByte(v) => (*v).into(),
        Field::UShort(v) => (*v).into(),
        Field::UInt(v) => (*v).into(),
        Field::ULong(v) => i64::try_from(*v).map_err(|_| anyhow!("label {v} is too large"))?,
        Field::Null => bail!("the label is null"),
        other => bail!("holds {other}, expected an int label"),
    })
}
