//! PyTorch checkpoints (`.pth`, `.pt`) read without Python.
//!
//! `torch.save(state_dict, path)` (torch >= 1.6) writes a zip archive of
//! STORED entries under one folder (the file stem, e.g. `archive/`):
//! `data.pkl`, a pickle (protocol 2) of the object, whose tensors point by
//! persistent id `('storage', torch.FloatStorage, key, location, numel)` at
//! the raw little-endian bytes in `data/<key>`; plus `byteorder` and
//! `version`.
//!
//! A pickle is a program: its `GLOBAL` and `REDUCE` opcodes import and call
//! any Python function, which is how a malicious checkpoint runs code on
//! `torch.load`. `data.pkl` is run on the pickle machine of
//! `formats::pickle`, which executes nothing; this file is the torch layer
//! on it. A global is only a name, accepted when it is on a short
//! allow-list of data constructors (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor` /
//! `_rebuild_parameter[_with_state]`, the `torch.*Storage` types), and
//! "calling" one builds a plain Rust value (an empty dict, a tensor
//! descriptor); a persistent id names a storage. Any other global
//! (`posix.system`, `builtins.eval`, a numpy type, a model class) is an
//! error naming it. The layer then picks the state_dict out of the object,
//! reads each storage from the zip once and gathers its tensors (any
//! offset and strides) into f32.
//!
//! Supported: the opcodes of protocols 2 to 5 that a pickled state_dict or
//! training checkpoint uses (no protocol-0 text opcodes, sets or
//! out-of-band buffers); float32, float16 and bfloat16 storages (other
//! dtypes are named in an error when a tensor that uses one is selected);
//! any storage offset and strides (views saved without `.contiguous()`,
//! broadcasts); entries written without CRC-32
//! (`torch.serialization.set_crc32_options(False)`). The top-level object is
//! a state_dict, or a dict holding one under `state_dict`, `model` or
//! `module`. Not supported: torch's legacy (pre-1.6) format, TorchScript
//! archives, big-endian files, compressed entries.
//!
//! Every count, length and index read from the file is checked before use,
//! so a truncated or corrupt file is an error, never a panic or a huge
//! allocation.

use super::checkpoint::RawTensor;
use crate::formats::pickle;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;
use std::rc::Rc;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// Where to find a state_dict inside a training checkpoint.
const WRAPPER_KEYS: [&str; 3] = ["state_dict", "model", "module"];

const LEGACY: &str = "saved with torch's legacy format; re-save with torch.save(..., _use_new_zipfile_serialization=True) or convert to safetensors";

/// Every tensor of a torch.save'd state_dict, converted to f32, by name.
///
/// Reads the zip format of torch >= 1.6 (see the module documentation):
/// a state_dict / OrderedDict of tensors, or a training checkpoint holding
/// one under `state_dict`, `model` or `module`. float32, float16 and
/// bfloat16 tensors of any layout are accepted. Nothing in the file is
/// executed; globals outside a small allow-list are refused. Errors name the
/// file and, where it applies, the tensor, opcode or global.
pub fn read_pth(path: &Path) -> Result<BTreeMap<String, RawTensor>> {
    // One flat message: callers that print only the outermost context still
    // see what went wrong, and where.
    read_file(path).map_err(|e| anyhow!("{}: {e:#}", path.display()))
}

/// True when `bytes` start like a zip archive (b"PK\x03\x04").
pub fn looks_like_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(ZIP_MAGIC)
}

type Zip = zip::ZipArchive<BufReader<File>>;

fn read_file(path: &Path) -> Result<BTreeMap<String, RawTensor>> {
    let mut file = File::open(path).context("cannot open the checkpoint")?;
    let file_len = file.metadata().context("cannot stat the checkpoint")?.len();
    let mut head = Vec::with_capacity(512);
    (&mut file)
        .take(512)
        .read_to_end(&mut head)
        .context("cannot read the checkpoint")?;
    if !looks_like_zip(&head) {
        return Err(not_zip(&head));
    }
    file.rewind().context("cannot read the checkpoint")?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .context("not a readable zip archive (truncated or corrupt?)")?;
    let prefix = archive_prefix(&zip)?;
    check_byteorder(&mut zip, &prefix, file_len)?;
    let pickle = read_entry(&mut zip, &format!("{prefix}/data.pkl"), file_len)?;
    let top = unpickle(&pickle).context("in data.pkl")?;
    let tensors = select_state_dict(&top)?;
    load_tensors(&mut zip, &prefix, &tensors, file_len)
}

/// Why a file that is not a zip archive cannot be read.
fn not_zip(head: &[u8]) -> anyhow::Error {
    // Legacy files are a bare pickle stream (PROTO opcode first); the
    // oldest ones a tar archive.
    let tar = head.get(257..262) == Some(b"ustar".as_slice());
    if head.first() == Some(&0x80) || tar {
        anyhow!("{LEGACY}")
    } else {
        anyhow!(
            "not a PyTorch checkpoint: neither a zip archive (torch >= 1.6) nor a legacy pickle"
        )
    }
}

/// The folder that holds `data.pkl` (torch names it after the file stem).
fn archive_prefix(zip: &Zip) -> Result<String> {
    let mut found = Vec::new();
    for name in zip.file_names() {
        let name = name.context("unreadable entry name in the zip archive")?;
        if let Some(prefix) = name.strip_suffix("/data.pkl") {
            if !prefix.is_empty() && !prefix.contains('/') {
                found.push(prefix.to_string());
            }
        }
    }
    match found.as_slice() {
        [one]
            if zip
                .index_for_name(&format!("{one}/constants.pkl"))
                .is_some() =>
        {
            bail!("a TorchScript archive (torch.jit.save), not a state_dict; save model.state_dict() with torch.save")
        }
        [one] => Ok(one.clone()),
        [] => bail!("a zip archive without <folder>/data.pkl: not written by torch.save"),
        many => bail!("a zip archive with several data.pkl ({many:?}): not written by torch.save"),
    }
}

/// Storages are read as little-endian; older archives have no `byteorder`
/// entry and were always little-endian.
fn check_byteorder(zip: &mut Zip, prefix: &str, file_len: u64) -> Result<()> {
    let name = format!("{prefix}/byteorder");
    if zip.index_for_name(&name).is_none() {
        return Ok(());
    }
    let order = read_entry(zip, &name, file_len)?;
    match order.as_slice() {
        b"little" => Ok(()),
        b"big" => bail!("saved on a big-endian machine; only little-endian checkpoints are supported (re-save on x86/ARM or convert to safetensors)"),
        other => bail!("entry {name} holds {:?}, expected \"little\"", String::from_utf8_lossy(other)),
    }
}

/// The bytes of one archive entry.
fn read_entry(zip: &mut Zip, name: &str, file_len: u64) -> Result<Vec<u8>> {
    let index = zip
        .index_for_name(name)
        .ok_or_else(|| anyhow!("the zip archive has no entry {name}"))?;
    let (method, crc) = {
        let entry = zip
            .by_index_raw(index)
            .with_context(|| format!("zip entry {name}"))?;
        (entry.compression(), entry.crc32())
    };
    // torch writes STORED entries only, so no decompressor is built in.
    ensure!(
        method == zip::CompressionMethod::Stored,
        "zip entry {name} is compressed ({method}); torch.save writes uncompressed archives, was this one re-zipped?"
    );
    // torch.serialization.set_crc32_options(False) writes CRC 0: such
    // entries are read as they are, the others are checked.
    let entry = if crc == 0 {
        zip.by_index_raw(index)
    } else {
        zip.by_index(index)
    };
    let mut entry = entry.with_context(|| format!("zip entry {name}"))?;
    let size = entry.size();
    // A STORED entry cannot be larger than the file: a corrupt size must
    // not turn into a huge allocation.
    ensure!(
        size <= file_len,
        "zip entry {name} claims {size} bytes, more than the whole file"
    );
    let mut bytes = Vec::with_capacity(usize::try_from(size)?);
    entry
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading zip entry {name} (truncated or corrupt?)"))?;
    ensure!(
        bytes.len() as u64 == size,
        "zip entry {name} is truncated: {} of {size} bytes",
        bytes.len()
    );
    Ok(bytes)
}

// ---------------------------------------------------------------------------
// The torch layer on the pickle machine: its globals and persistent ids.

/// Element types of the storages torch names in a pickle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F32,
    F16,
    BF16,
    /// A storage type that is known data but not read (`torch.LongStorage`…).
    Unsupported(&'static str),
}

impl Dtype {
    fn elem_size(self) -> Option<usize> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            Dtype::Unsupported(_) => None,
        }
    }
}

/// The allowed globals: constructors of plain data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    Storage(Dtype),
}

impl Global {
    fn python_name(self) -> &'static str {
        match self {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildTensor => "torch._utils._rebuild_tensor",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::Storage(Dtype::F32) => "torch.FloatStorage",
            Global::Storage(Dtype::F16) => "torch.HalfStorage",
            Global::Storage(Dtype::BF16) => "torch.BFloat16Storage",
            Global::Storage(Dtype::Unsupported(what)) => what,
        }
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    let storage = |d| Ok(Global::Storage(d));
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_tensor") => Ok(Global::RebuildTensor),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => Ok(Global::RebuildParameterWithState),
        ("torch", "FloatStorage") => storage(Dtype::F32),
        ("torch", "HalfStorage") => storage(Dtype::F16),
        ("torch", "BFloat16Storage") => storage(Dtype::BF16),
        // Recognised so that an integer buffer is reported by tensor name
        // and dtype, not as a mysterious global; such tensors are refused.
        ("torch", "DoubleStorage") => storage(Dtype::Unsupported("float64 (torch.DoubleStorage)")),
        ("torch", "LongStorage") => storage(Dtype::Unsupported("int64 (torch.LongStorage)")),
        ("torch", "IntStorage") => storage(Dtype::Unsupported("int32 (torch.IntStorage)")),
        ("torch", "ShortStorage") => storage(Dtype::Unsupported("int16 (torch.ShortStorage)")),
        ("torch", "CharStorage") => storage(Dtype::Unsupported("int8 (torch.CharStorage)")),
        ("torch", "ByteStorage") => storage(Dtype::Unsupported("uint8 (torch.ByteStorage)")),
        ("torch", "BoolStorage") => storage(Dtype::Unsupported("bool (torch.BoolStorage)")),
        _ => bail!(
            "refusing global {module}.{name}: only collections.OrderedDict, torch._utils._rebuild_tensor* / _rebuild_parameter* and torch.*Storage may appear in a checkpoint (nothing is executed)"
        ),
    }
}

/// A storage as a persistent id names it.
#[derive(Debug)]
struct Storage {
    key: String,
    dtype: Dtype,
    numel: usize,
}

/// A tensor before its bytes are read.
#[derive(Debug)]
struct TensorDesc {
    storage: Rc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// What the hooks build: an allowed global, a storage (from a persistent
/// id) or a tensor (from calling `_rebuild_tensor*`). Cheap to clone.
#[derive(Clone, Debug)]
enum Torch {
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<TensorDesc>),
}

impl pickle::Object for Torch {
    fn kind(&self) -> String {
        match self {
            Torch::Global(g) => format!("the global {}", g.python_name()),
            Torch::Storage(_) => "a storage".into(),
            Torch::Tensor(_) => "a tensor".into(),
        }
    }
}

type Value = pickle::Value<Torch>;
type Dict = pickle::Dict<Torch>;

/// The torch layer's answers to the opcodes that import and call.
struct TorchHooks;

impl pickle::Hooks for TorchHooks {
    type Object = Torch;

    fn global(&mut self, module: &str, name: &str) -> Result<Torch> {
        resolve_global(module, name).map(Torch::Global)
    }

    fn call(&mut self, callable: &Torch, args: &[Value]) -> Result<Value> {
        call(callable, args)
    }

    fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        Ok(Value::Object(Torch::Storage(Rc::new(storage_from_pid(
            pid,
        )?))))
    }

    fn build(&mut self, target: &mut Value, state: Value) -> Result<()> {
        match target {
            // nn.Module.state_dict() sets `_metadata` (module versions) on
            // the OrderedDict; the tensors do not need it.
            Value::Dict(_) => Ok(()),
            other => bail!("BUILD on {} (with state {})", other.kind(), state.kind()),
        }
    }
}

/// Run the pickle `data` (a `data.pkl`) and return the object it builds.
fn unpickle(data: &[u8]) -> Result<Value> {
    pickle::unpickle(data, &mut TorchHooks)
}

/// What REDUCE (or NEWOBJ) of an allowed global means, as plain data.
fn call(callable: &Torch, args: &[Value]) -> Result<Value> {
    let Torch::Global(global) = callable else {
        bail!(
            "calling {}, not an allowed global",
            pickle::Object::kind(callable)
        )
    };
    match global {
        Global::OrderedDict => {
            ensure!(
                args.is_empty(),
                "OrderedDict called with {} arguments; pickles build it empty",
                args.len()
            );
            Ok(Value::new_dict())
        }
        Global::RebuildTensorV2 => {
            // (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
            ensure!(
                matches!(args.len(), 6 | 7),
                "_rebuild_tensor_v2 takes 6 or 7 arguments, got {}",
                args.len()
            );
            ensure!(
                matches!(args[4], Value::Bool(_)),
                "requires_grad is {}, expected a bool",
                args[4].kind()
            );
            rebuild_tensor(&args[..4])
        }
        Global::RebuildTensor => {
            ensure!(
                args.len() == 4,
                "_rebuild_tensor takes 4 arguments, got {}",
                args.len()
            );
            rebuild_tensor(args)
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => {
            // (data, requires_grad, backward_hooks[, state]): the tensor is all we keep.
            let want = if *global == Global::RebuildParameter {
                3
            } else {
                4
            };
            ensure!(
                args.len() == want,
                "{} takes {want} arguments, got {}",
                global.python_name(),
                args.len()
            );
            match &args[0] {
                Value::Object(Torch::Tensor(_)) => Ok(args[0].clone()),
                other => bail!("a Parameter wrapping {}, expected a tensor", other.kind()),
            }
        }
        Global::Storage(_) => bail!("a storage type is not called in a state_dict pickle"),
    }
}

/// `(storage, storage_offset, size, stride)` -> a tensor descriptor; the
/// bounds against the storage are checked when its bytes are read.
fn rebuild_tensor(args: &[Value]) -> Result<Value> {
    let [storage, offset, shape, stride] = args else {
        bail!("expected storage, offset, size, stride")
    };
    let Value::Object(Torch::Storage(storage)) = storage else {
        bail!(
            "tensor storage is {}, expected a persistent storage",
            storage.kind()
        )
    };
    let offset = to_usize(offset).context("storage_offset")?;
    let shape = usize_tuple(shape).context("size")?;
    let stride = usize_tuple(stride).context("stride")?;
    ensure!(
        shape.len() == stride.len(),
        "size has {} dimensions, stride {}",
        shape.len(),
        stride.len()
    );
    Ok(Value::Object(Torch::Tensor(Rc::new(TensorDesc {
        storage: storage.clone(),
        offset,
        shape,
        stride,
    }))))
}

fn to_usize(v: &Value) -> Result<usize> {
    match v {
        Value::Int(i) => {
            usize::try_from(*i).map_err(|_| anyhow!("{i} is not a valid size or index"))
        }
        other => bail!("{}, expected an int", other.kind()),
    }
}

fn usize_tuple(v: &Value) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(s) | Value::List(s) => s.items().iter().map(to_usize).collect(),
        other => bail!("{}, expected a tuple of ints", other.kind()),
    }
}

/// `('storage', storage_type, key, location, numel)` -> the storage.
fn storage_from_pid(pid: &Value) -> Result<Storage> {
    let Value::Tuple(t) = pid else {
        bail!("persistent id is {}, expected a tuple", pid.kind())
    };
    let [tag, ty, key, _location, numel] = t.items() else {
        bail!(
            "persistent id has {} fields, expected ('storage', type, key, location, numel)",
            t.items().len()
        )
    };
    ensure!(
        tag.str() == Some("storage"),
        "persistent id starting with {}, expected 'storage'",
        tag.kind()
    );
    let Value::Object(Torch::Global(Global::Storage(dtype))) = ty else {
        bail!("storage type is {}, expected torch.*Storage", ty.kind())
    };
    let key = match key {
        Value::Str(s) => s.to_string(),
        Value::Int(i) => i.to_string(),
        other => bail!("storage key is {}, expected a str", other.kind()),
    };
    let numel = to_usize(numel).context("storage numel")?;
    Ok(Storage {
        key,
        dtype: *dtype,
        numel,
    })
}

// ---------------------------------------------------------------------------
// From the unpickled object to tensors.

/// The state_dict inside the top-level object, as (name, tensor) pairs.
fn select_state_dict(top: &Value) -> Result<Vec<(String, Rc<TensorDesc>)>> {
    let Value::Dict(dict) = top else {
        bail!(
            "the checkpoint holds {}, expected a dict of tensors (a state_dict)",
            top.kind()
        )
    };
    if dict
        .items()
        .iter()
        .all(|(_, v)| matches!(v, Value::Object(Torch::Tensor(_))))
    {
        return tensor_entries(dict);
    }
    let wrapped: Vec<(&str, &Dict)> = dict
        .items()
        .iter()
        .filter_map(|(k, v)| match (k.str(), v) {
            (Some(k), Value::Dict(d)) if WRAPPER_KEYS.contains(&k) => Some((k, &**d)),
            _ => None,
        })
        .collect();
    let all_tensors: Vec<&(&str, &Dict)> = wrapped
        .iter()
        .filter(|(_, d)| {
            d.items()
                .iter()
                .all(|(_, v)| matches!(v, Value::Object(Torch::Tensor(_))))
        })
        .collect();
    match (all_tensors.as_slice(), wrapped.as_slice()) {
        ([(name, d)], _) => {
            tensor_entries(d).with_context(|| format!("in the checkpoint's {name:?}"))
        }
        // One candidate with a stray value: say which key is wrong.
        ([], [(name, d)]) => {
            tensor_entries(d).with_context(|| format!("in the checkpoint's {name:?}"))
        }
        _ if dict
            .items()
            .iter()
            .any(|(_, v)| matches!(v, Value::Object(Torch::Tensor(_)))) =>
        {
            tensor_entries(dict)
        }
        _ => bail!(
            "no state_dict found: the checkpoint is the dict {}",
            describe(dict)
        ),
    }
}

/// The keys and kinds of a dict, for error messages.
fn describe(dict: &Dict) -> String {
    let mut parts: Vec<String> = dict
        .items()
        .iter()
        .take(8)
        .map(|(k, v)| {
            format!(
                "{}: {}",
                k.str().map_or_else(|| k.kind(), |s| format!("{s:?}")),
                v.kind()
            )
        })
        .collect();
    if dict.items().len() > 8 {
        parts.push(format!("... ({} entries)", dict.items().len()));
    }
    format!("{{{}}}", parts.join(", "))
}

fn tensor_entries(dict: &Dict) -> Result<Vec<(String, Rc<TensorDesc>)>> {
    dict.items()
        .iter()
        .map(|(k, v)| {
            let name = k
                .str()
                .ok_or_else(|| anyhow!("a state_dict key is {}, expected a str", k.kind()))?;
            match v {
                Value::Object(Torch::Tensor(t)) => Ok((name.to_string(), t.clone())),
                other => bail!("state_dict entry {name} is {}, not a tensor", other.kind()),
            }
        })
        .collect()
}

/// Read each storage once and cut its tensors out of it.
fn load_tensors(
    zip: &mut Zip,
    prefix: &str,
    tensors: &[(String, Rc<TensorDesc>)],
    file_len: u64,
) -> Result<BTreeMap<String, RawTensor>> {
    check_sizes(tensors, file_len)?;
    let mut by_storage: BTreeMap<&str, Vec<&(String, Rc<TensorDesc>)>> = BTreeMap::new();
    for entry in tensors {
        by_storage
            .entry(entry.1.storage.key.as_str())
            .or_default()
            .push(entry);
    }
    let mut out = BTreeMap::new();
    for (key, users) in by_storage {
        let name = format!("{prefix}/data/{key}");
        let bytes = read_entry(zip, &name, file_len)
            .with_context(|| format!("storage of tensor {}", users[0].0))?;
        for (tensor, desc) in users {
            let data = gather(desc, &bytes)
                .with_context(|| format!("tensor {tensor} (storage {name})"))?;
            out.insert(
                tensor.clone(),
                RawTensor {
                    shape: desc.shape.clone(),
                    data,
                },
            );
        }
    }
    Ok(out)
}

/// Dtypes and element counts, before anything is read. The output may
/// exceed the file (broadcasts, several views of one storage) but not by
/// much: a few pickle bytes must not ask for terabytes.
fn check_sizes(tensors: &[(String, Rc<TensorDesc>)], file_len: u64) -> Result<()> {
    let budget = file_len.saturating_mul(4).saturating_add(1 << 24);
    let mut total: u64 = 0;
    for (name, t) in tensors {
        if let Dtype::Unsupported(what) = t.storage.dtype {
            bail!(
                "tensor {name} has dtype {what}; only float32, float16 and bfloat16 are supported"
            );
        }
        let numel = numel(&t.shape)
            .ok_or_else(|| anyhow!("tensor {name}: size {:?} overflows", t.shape))?;
        total = total.saturating_add(numel as u64);
        ensure!(
            total <= budget,
            "tensor {name}: {total} elements in all, far more than a {file_len}-byte file can hold"
        );
    }
    Ok(())
}

fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The tensor's elements in row-major order, read through its offset and
/// strides from the storage bytes.
fn gather(t: &TensorDesc, bytes: &[u8]) -> Result<Vec<f32>> {
    let elem = t
        .storage
        .dtype
        .elem_size()
        .ok_or_else(|| anyhow!("unsupported dtype"))?;
    let stored = t
        .storage
        .numel
        .checked_mul(elem)
        .filter(|&n| n <= bytes.len());
    ensure!(
        stored.is_some(),
        "storage too short: {} bytes for {} elements of {elem} bytes",
        bytes.len(),
        t.storage.numel
    );
    let count = numel(&t.shape).ok_or_else(|| anyhow!("size {:?} overflows", t.shape))?;
    if count == 0 {
        return Ok(Vec::new()); // torch does not bounds-check empty tensors either
    }
    // A stride of a size-1 dimension is never used; zeroing it keeps the
    // arithmetic below within the checked extent.
    let stride: Vec<usize> = t
        .shape
        .iter()
        .zip(&t.stride)
        .map(|(&n, &s)| if n == 1 { 0 } else { s })
        .collect();
    let last = t
        .shape
        .iter()
        .zip(&stride)
        .try_fold(t.offset, |acc, (&n, &s)| {
            (n - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
        });
    let last = last.filter(|&l| l < t.storage.numel).ok_or_else(|| {
        anyhow!(
            "offset {} with size {:?} and stride {:?} reaches past the storage's {} elements",
            t.offset,
            t.shape,
            t.stride,
            t.storage.numel
        )
    })?;
    let region = decode(t.storage.dtype, &bytes[t.offset * elem..(last + 1) * elem]);
    if is_row_major(&t.shape, &stride) {
        return Ok(region); // contiguous: nothing to gather
    }
    strided(&region, &t.shape, &stride, count)
}

/// Strides of a contiguous row-major tensor (size-1 dimensions excepted).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&n, &s) in shape.iter().zip(stride).rev() {
        if n != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(n);
    }
    true
}

/// Walk the index space in row-major order; `region` starts at the offset.
fn strided(region: &[f32], shape: &[usize], stride: &[usize], count: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; shape.len()];
    let mut pos = 0usize;
    for _ in 0..count {
        out.push(
            *region
                .get(pos)
                .ok_or_else(|| anyhow!("strided index {pos} outside the tensor's extent"))?,
        );
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            pos += stride[d];
            if index[d] < shape[d] {
                break;
            }
            pos -= stride[d] * shape[d];
            index[d] = 0;
        }
    }
    Ok(out)
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::Unsupported(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::pickle::writer::P;
    use std::io::{Cursor, Write};
    use std::path::PathBuf;

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    fn message(r: Result<BTreeMap<String, RawTensor>>) -> String {
        match r {
            Ok(t) => panic!("read fine ({} tensors), expected an error", t.len()),
            Err(e) => format!("{e:#}"),
        }
    }

    fn error_of(path: &Path) -> String {
        message(read_pth(path))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    // --- hand-built pickles --------------------------------------------

    /// The torch opcodes on top of the pickle writer.
    trait TorchPickle {
        fn ordered_dict(self) -> Self;
        fn tensor(
            self,
            storage: &str,
            key: &str,
            numel: usize,
            offset: usize,
            shape: &[usize],
            stride: &[usize],
        ) -> Self;
    }

    impl TorchPickle for P {
        fn ordered_dict(self) -> Self {
            self.global("collections", "OrderedDict").op(b")R")
        }
        /// `_rebuild_tensor_v2(('storage', torch.<storage>, key, 'cpu', numel), offset, shape, stride, False, OrderedDict())`
        fn tensor(
            self,
            storage: &str,
            key: &str,
            numel: usize,
            offset: usize,
            shape: &[usize],
            stride: &[usize],
        ) -> Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b"((")
                .str("storage")
                .global("torch", storage)
                .str(key)
                .str("cpu")
                .int(numel as i32)
                .op(b"tQ")
                .int(offset as i32)
                .ints(shape)
                .ints(stride)
                .op(&[0x89])
                .ordered_dict()
                .op(b"tR")
        }
    }

    /// A float32 tensor: name, storage key, storage numel, offset, shape, stride.
    type Spec<'a> = (&'a str, &'a str, usize, usize, &'a [usize], &'a [usize]);

    /// An OrderedDict of float32 tensors.
    fn state_dict(tensors: &[Spec]) -> Vec<u8> {
        let p = tensors.iter().fold(
            P::new().ordered_dict().op(b"("),
            |p, &(name, key, numel, offset, shape, stride)| {
                p.str(name)
                    .tensor("FloatStorage", key, numel, offset, shape, stride)
            },
        );
        p.op(b"u").stop()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn zip_bytes(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in entries {
            w.start_file(name.as_str(), opts).unwrap();
            w.write_all(bytes).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// A torch-like archive: `prefix/data.pkl`, `prefix/byteorder`, `prefix/data/<key>`.
    fn archive(
        prefix: &str,
        pickle: &[u8],
        storages: &[(&str, Vec<u8>)],
        byteorder: &str,
    ) -> Vec<u8> {
        let mut entries = vec![
            (format!("{prefix}/data.pkl"), pickle.to_vec()),
            (format!("{prefix}/byteorder"), byteorder.as_bytes().to_vec()),
        ];
        entries.extend(
            storages
                .iter()
                .map(|(k, b)| (format!("{prefix}/data/{k}"), b.clone())),
        );
        entries.push((format!("{prefix}/version"), b"3\n".to_vec()));
        zip_bytes(&entries)
    }

    fn write_temp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn unpickle_err(bytes: &[u8]) -> String {
        match unpickle(bytes) {
            Ok(v) => panic!("unpickled to {}, expected an error", v.kind()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn zip_magic() {
        assert!(looks_like_zip(b"PK\x03\x04rest"));
        assert!(!looks_like_zip(b"PK\x03"));
        assert!(!looks_like_zip(b"\x80\x02\x8a\x0a"));
    }

    #[test]
    fn forbidden_globals_are_refused() {
        let e = unpickle_err(
            &P::new()
                .global("builtins", "eval")
                .str("1+1")
                .op(&[0x85])
                .op(b"R")
                .stop(),
        );
        assert!(e.contains("builtins.eval") && e.contains("GLOBAL"), "{e}");
        let e = unpickle_err(
            &P::new()
                .str("os")
                .str("system")
                .op(&[0x93])
                .str("echo pwned")
                .op(&[0x85, b'R'])
                .stop(),
        );
        assert!(e.contains("os.system") && e.contains("STACK_GLOBAL"), "{e}");
        let e = unpickle_err(
            &P::new()
                .global("numpy.core.multiarray", "_reconstruct")
                .stop(),
        );
        assert!(e.contains("numpy.core.multiarray._reconstruct"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = state_dict(&[
            ("w", "0", 6, 0, &[2, 3], &[3, 1]),
            ("b", "1", 2, 0, &[2], &[1]),
        ]);
        assert!(matches!(unpickle(&full), Ok(Value::Dict(_))));
        for n in 0..full.len() {
            let e = unpickle_err(&full[..n]);
            assert!(
                e.contains("truncated") || e.contains("underflow") || e.contains("MARK"),
                "{n}: {e}"
            );
        }
    }

    #[test]
    fn strided_gather() {
        let storage = Rc::new(Storage {
            key: "0".into(),
            dtype: Dtype::F32,
            numel: 6,
        });
        let bytes = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
        let t = |offset, shape: &[usize], stride: &[usize]| TensorDesc {
            storage: storage.clone(),
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        };
        // A 2x2 transpose spans exactly 4 elements and still needs a gather.
        assert_eq!(
            gather(&t(0, &[2, 2], &[1, 2]), &bytes).unwrap(),
            [0., 2., 1., 3.]
        );
        assert_eq!(
            gather(&t(0, &[3, 2], &[1, 3]), &bytes).unwrap(),
            [0., 3., 1., 4., 2., 5.]
        );
        assert_eq!(gather(&t(1, &[2], &[3]), &bytes).unwrap(), [1., 4.]);
        assert_eq!(
            gather(&t(2, &[2, 3], &[0, 1]), &bytes).unwrap(),
            [2., 3., 4., 2., 3., 4.]
        );
        assert_eq!(
            gather(&t(5, &[1, 1], &[usize::MAX, 7]), &bytes).unwrap(),
            [5.]
        );
        assert_eq!(gather(&t(5, &[], &[]), &bytes).unwrap(), [5.]);
        assert!(gather(&t(99, &[0, 4], &[4, 1]), &bytes).unwrap().is_empty());
        for (offset, shape, stride) in [
            (1, &[6][..], &[1][..]),
            (0, &[2, 3], &[4, 1]),
            (6, &[], &[]),
            (0, &[2, 2], &[usize::MAX / 2, 1]),
        ] {
            let e = format!(
                "{:#}",
                gather(&t(offset, shape, stride), &bytes).unwrap_err()
            );
            assert!(e.contains("past the storage"), "{e}");
        }
        let short = TensorDesc {
            storage: Rc::new(Storage {
                key: "0".into(),
                dtype: Dtype::F32,
                numel: 7,
            }),
            offset: 0,
            shape: vec![6],
            stride: vec![1],
        };
        assert!(format!("{:#}", gather(&short, &bytes).unwrap_err()).contains("storage too short"));
    }

    #[test]
    fn hand_built_archives() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = state_dict(&[
            ("w", "0", 6, 0, &[3, 2], &[1, 3]),
            ("b", "1", 2, 0, &[2], &[1]),
            ("tied", "0", 6, 2, &[2], &[1]),
        ]);
        let storages = [
            ("0", f32_bytes(&[0., 1., 2., 3., 4., 5.])),
            ("1", f32_bytes(&[-1., 1.])),
        ];
        let ok = write_temp(
            &dir,
            "ok.pth",
            &archive("any_name-1234", &pickle, &storages, "little"),
        );
        let t = read_pth(&ok).unwrap();
        assert_eq!(t["w"].shape, [3, 2]);
        assert_eq!(t["w"].data, [0., 3., 1., 4., 2., 5.]);
        assert_eq!(t["b"].data, [-1., 1.]);
        assert_eq!(t["tied"].data, [2., 3.]);

        let big = write_temp(&dir, "big.pth", &archive("a", &pickle, &storages, "big"));
        assert!(error_of(&big).contains("big-endian"));
        let missing = write_temp(
            &dir,
            "missing.pth",
            &archive("a", &pickle, &storages[..1], "little"),
        );
        let e = error_of(&missing);
        assert!(
            e.contains("missing.pth") && e.contains("a/data/1") && e.contains("tensor b"),
            "{e}"
        );
        let short = [storages[0].clone(), ("1", f32_bytes(&[1.]))];
        let e = error_of(&write_temp(
            &dir,
            "short.pth",
            &archive("a", &pickle, &short, "little"),
        ));
        assert!(
            e.contains("storage too short") && e.contains("tensor b"),
            "{e}"
        );
        let oob = state_dict(&[("w", "0", 6, 1, &[3, 2], &[2, 1])]);
        let e = error_of(&write_temp(
            &dir,
            "oob.pth",
            &archive("a", &oob, &storages, "little"),
        ));
        assert!(
            e.contains("tensor w") && e.contains("past the storage"),
            "{e}"
        );
        let huge = state_dict(&[("w", "0", 6, 0, &[1 << 30, 1 << 30], &[0, 0])]);
        let e = error_of(&write_temp(
            &dir,
            "huge.pth",
            &archive("a", &huge, &storages, "little"),
        ));
        assert!(
            e.contains("tensor w") && e.contains("elements in all"),
            "{e}"
        );

        // Mark every entry DEFLATED, as a re-zipped archive would be.
        let mut deflated = archive("a", &pickle, &storages, "little");
        for i in 0..deflated.len() - 12 {
            let at = match &deflated[i..i + 4] {
                b"PK\x03\x04" => i + 8,
                b"PK\x01\x02" => i + 10,
                _ => continue,
            };
            deflated[at] = 8;
        }
        let e = error_of(&write_temp(&dir, "deflated.pth", &deflated));
        assert!(e.contains("is compressed (Deflated)"), "{e}");
        let no_pkl = zip_bytes(&[("a/data/0".into(), vec![0; 4])]);
        assert!(
            error_of(&write_temp(&dir, "nopkl.pth", &no_pkl)).contains("without <folder>/data.pkl")
        );
        let script = zip_bytes(&[
            ("m/data.pkl".into(), pickle.clone()),
            ("m/constants.pkl".into(), vec![]),
        ]);
        assert!(error_of(&write_temp(&dir, "script.pt", &script)).contains("TorchScript"));
        assert!(
            error_of(&write_temp(&dir, "text.pth", b"hello")).contains("not a PyTorch checkpoint")
        );
        assert!(error_of(&write_temp(
            &dir,
            "cut.pth",
            &std::fs::read(&ok).unwrap()[..100]
        ))
        .contains("zip"));
        assert!(error_of(&dir.path().join("absent.pth")).contains("absent.pth"));
    }

    #[test]
    fn top_level_objects() {
        let dir = tempfile::tempdir().unwrap();
        let storages = [("0", f32_bytes(&[1., 2.]))];
        let read = |name: &str, pickle: Vec<u8>| {
            read_pth(&write_temp(
                &dir,
                name,
                &archive("a", &pickle, &storages, "little"),
            ))
        };
        let tensor = |p: P| p.tensor("FloatStorage", "0", 2, 0, &[2], &[1]);
        // Training checkpoint: the state_dict is under "model".
        let ck = tensor(
            P::new()
                .op(b"}(")
                .str("epoch")
                .int(3)
                .str("model")
                .op(b"}")
                .str("w"),
        )
        .op(b"s")
        .str("opt")
        .op(b"}u")
        .stop();
        assert_eq!(read("ck.pth", ck).unwrap()["w"].data, [1., 2.]);
        // A Parameter is its tensor.
        let param = tensor(
            P::new()
                .op(b"}")
                .str("p")
                .global("torch._utils", "_rebuild_parameter"),
        )
        .op(&[0x88])
        .ordered_dict()
        .op(&[0x87])
        .op(b"Rs")
        .stop();
        assert_eq!(read("param.pth", param).unwrap()["p"].shape, [2]);
        // BUILD (module `_metadata`) on the OrderedDict is ignored.
        let meta = tensor(P::new().ordered_dict().str("w"))
            .op(b"s}")
            .str("_metadata")
            .op(b"}sb")
            .stop();
        assert_eq!(read("meta.pth", meta).unwrap().len(), 1);

        let stray = tensor(P::new().op(b"}(").str("w"))
            .str("n")
            .int(1)
            .op(b"u")
            .stop();
        let e = message(read("stray.pth", stray));
        assert!(e.contains("entry n is the int 1, not a tensor"), "{e}");
        let two = P::new()
            .op(b"}(")
            .str("model")
            .op(b"}")
            .str("module")
            .op(b"}")
            .str("x")
            .int(0)
            .op(b"u")
            .stop();
        assert!(message(read("two.pth", two)).contains("no state_dict found"));
        let list = P::new().op(b"]").stop();
        assert!(message(read("list.pth", list)).contains("holds a list of 0, expected a dict"));
        let long = P::new()
            .op(b"}")
            .str("n")
            .tensor("LongStorage", "0", 1, 0, &[1], &[1])
            .op(b"s")
            .stop();
        let e = message(read("long.pth", long));
        assert!(e.contains("tensor n has dtype int64"), "{e}");
    }

    // --- files written by scripts/make_pth_reference.py -----------------

    fn safetensors_f32(path: &Path) -> BTreeMap<String, RawTensor> {
        use safetensors::tensor::Dtype as St;
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .map(|(name, view)| {
                let b = view.data();
                let data = match view.dtype() {
                    St::F32 => b
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                    St::F16 => b
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                        .collect(),
                    St::BF16 => b
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32())
                        .collect(),
                    other => panic!("{name}: {other:?}"),
                };
                (
                    name,
                    RawTensor {
                        shape: view.shape().to_vec(),
                        data,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn torchvision_tiny_matches_its_safetensors() {
        let pth = read_pth(&data("torchvision_tiny.pth")).unwrap();
        let st = safetensors_f32(&data("torchvision_tiny.safetensors"));
        assert_eq!(
            pth.keys().collect::<Vec<_>>(),
            st.keys().collect::<Vec<_>>()
        );
        assert!(pth.contains_key("encoder.layers.encoder_layer_1.self_attention.in_proj_weight"));
        for (name, t) in &st {
            assert_eq!(pth[name].shape, t.shape, "{name}");
            assert_eq!(bits(&pth[name].data), bits(&t.data), "{name}");
        }
    }

    #[test]
    fn dtypes_match_their_json() {
        let got = read_pth(&data("pth_dtypes.pth")).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(data("pth_dtypes.json")).unwrap())
                .unwrap();
        let want = json.as_object().unwrap();
        assert_eq!(got.len(), want.len());
        for (name, w) in want {
            let shape: Vec<usize> = w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let values: Vec<f32> = w["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(got[name].shape, shape, "{name}");
            assert_eq!(bits(&got[name].data), bits(&values), "{name}");
        }
        assert_eq!(
            want["w_t"]["stride"],
            serde_json::json!([1, 5]),
            "the file holds a real view"
        );
        assert_eq!(want["rows"]["storage_offset"], 6);
    }

    #[test]
    fn training_checkpoint_and_crc_less_archive() {
        let ck = read_pth(&data("pth_checkpoint.pth")).unwrap();
        assert_eq!(
            ck.keys().collect::<Vec<_>>(),
            ["0.bias", "0.weight", "1.bias", "1.weight"]
        );
        assert_eq!(ck["0.weight"].shape, [3, 4]);
        let nocrc = read_pth(&data("pth_nocrc.pth")).unwrap();
        assert_eq!(nocrc["w"].data, [0., 1., 2., 3., 4., 5.]);
        assert_eq!(nocrc["b"].data, [0.5, -1.]);
    }

    #[test]
    fn forbidden_and_legacy_files() {
        let e = error_of(&data("pth_forbidden.pth"));
        assert!(
            e.contains("pth_forbidden.pth")
                && (e.contains("posix.system") || e.contains("os.system")),
            "{e}"
        );
        let e = error_of(&data("pth_legacy.pt"));
        assert!(
            e.contains("pth_legacy.pt")
                && e.contains("legacy format")
                && e.contains("_use_new_zipfile_serialization=True"),
            "{e}"
        );
    }

    // --- robustness -------------------------------------------------------

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Mutated copies of torchvision_tiny.pth: truncated, with bytes
    /// overwritten anywhere, and (re-zipped, so that the CRC passes and the
    /// pickle machine sees them) with data.pkl or a storage corrupted. Each
    /// read must return, Ok or Err, without panicking.
    #[test]
    fn mutated_files_never_panic() {
        let original = std::fs::read(data("torchvision_tiny.pth")).unwrap();
        let mut zip = zip::ZipArchive::new(Cursor::new(&original)).unwrap();
        let entries: Vec<(String, Vec<u8>)> = (0..zip.len())
            .map(|i| {
                let mut f = zip.by_index(i).unwrap();
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes).unwrap();
                (f.name().unwrap().to_string(), bytes)
            })
            .collect();
        let pkl = entries
            .iter()
            .position(|(n, _)| n.ends_with("/data.pkl"))
            .unwrap();
        let storages: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].0.contains("/data/"))
            .collect();
        const OPCODES: &[u8] = b"().0125}])dltNJKMGXTUBCqrhjaesucRbQ\x80\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x93\x94\x95";

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mutant.pth");
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut err) = (0, 0);
        let trials = 3000;
        for trial in 0..trials {
            let kind = trial % 6;
            let bytes = match kind {
                0 => original[..rng.below(original.len())].to_vec(),
                1 => {
                    let mut b = original.clone();
                    for _ in 0..1 + rng.below(8) {
                        let i = rng.below(b.len());
                        b[i] = rng.next() as u8;
                    }
                    b
                }
                _ => {
                    let mut e = entries.clone();
                    let p = &mut e[pkl].1;
                    match kind {
                        2 => (0..1 + rng.below(4)).for_each(|_| {
                            let i = rng.below(p.len());
                            p[i] ^= 1 << rng.below(8);
                        }),
                        3 => p.truncate(rng.below(p.len())),
                        4 => (0..1 + rng.below(3)).for_each(|_| {
                            let i = rng.below(p.len());
                            p[i] = OPCODES[rng.below(OPCODES.len())];
                        }),
                        _ => {
                            let s = &mut e[storages[rng.below(storages.len())]].1;
                            s.truncate(rng.below(s.len()));
                        }
                    }
                    zip_bytes(&e)
                }
            };
            std::fs::write(&path, &bytes).unwrap();
            match std::panic::catch_unwind(|| read_pth(&path)) {
                Ok(Ok(_)) => ok += 1,
                Ok(Err(e)) => {
                    assert!(
                        format!("{e:#}").contains("mutant.pth"),
                        "error without the file name: {e:#}"
                    );
                    err += 1;
                }
                Err(_) => panic!("read_pth panicked on mutation {trial} (kind {kind})"),
            }
        }
        eprintln!("{trials} mutations: {ok} read, {err} refused");
        assert_eq!(ok + err, trials);
        assert!(
            err > trials / 2,
            "most mutations must be caught ({err} of {trials})"
        );
    }
}
