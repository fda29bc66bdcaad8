//! numpy arrays in pickles, read without Python.
//!
//! `pickle.dump` of a numpy array (numpy's `ndarray.__reduce__`) writes
//!
//! ```text
//! numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')   REDUCE
//! BUILD (1, shape, dtype, is_fortran, raw bytes)
//! ```
//!
//! with the dtype itself pickled as `numpy.dtype('u1', 0, 1)` REDUCE, then
//! BUILD `(3, '|', None, None, None, -1, -1, 0)` (version, byte order,
//! subarray, names, fields, item size, alignment, flags; version 4 adds
//! metadata). The official CIFAR pickles were written this way by Python
//! 2's cPickle at protocol 2: every string, the raw array bytes included, is
//! a Python 2 `str` (`BINSTRING` / `SHORT_BINSTRING`), so this layer keeps
//! Python 2 strings as bytes (Python's `encoding='bytes'`) and its callers
//! match keys as bytes or str.
//!
//! This is a layer on the pickle machine of `formats::pickle`, which
//! executes nothing: three globals are accepted as names,
//! `numpy.core.multiarray._reconstruct` (`numpy._core.multiarray` since
//! numpy 2), `numpy.ndarray` and `numpy.dtype`, and "calling" them builds
//! plain Rust values. Any other global is an error naming it.
//!
//! Read: C-order arrays of bool, signed and unsigned integers and floats of
//! the usual sizes, either byte order. Not read: object arrays, structured
//! and subarray dtypes, Fortran-order arrays of more than one dimension;
//! each is an error naming what was found.

use super::pickle::{self, Hooks};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::cell::OnceCell;
use std::rc::Rc;

/// A value of an unpickled object tree whose arrays are numpy's.
pub type Value = pickle::Value<Numpy>;

/// Run `data` (a pickle) and return the object it builds.
pub fn unpickle(data: &[u8]) -> Result<Value> {
    pickle::unpickle(data, &mut NumpyHooks)
}

/// Byte order of a multi-byte element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOrder {
    Little,
    Big,
}

/// An element type: `kind` is numpy's character (`b` bool, `i` signed,
/// `u` unsigned, `f` float), `size` its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElemType {
    pub kind: char,
    pub size: usize,
    pub order: ByteOrder,
}

impl ElemType {
    /// numpy's name for it: `<i8`, `|u1`.
    pub fn name(&self) -> String {
        let order = match (self.size, self.order) {
            (1, _) => '|',
            (_, ByteOrder::Little) => '<',
            (_, ByteOrder::Big) => '>',
        };
        format!("{order}{}{}", self.kind, self.size)
    }
}

/// An array after its BUILD: C-order elements as the file holds them.
#[derive(Debug)]
pub struct NdArray {
    pub elem: ElemType,
    pub shape: Vec<usize>,
    pub data: Rc<[u8]>,
}

impl NdArray {
    /// The elements of a `u1` array.
    pub fn as_u8(&self) -> Result<&[u8]> {
        ensure!(
            (self.elem.kind, self.elem.size) == ('u', 1),
            "array of {}, expected uint8 (|u1)",
            self.elem.name()
        );
        Ok(&self.data)
    }

    /// The elements of an integer (or bool) array, widened to i64. A `u8`
    /// element above `i64::MAX` is an error.
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        let e = self.elem;
        ensure!(
            matches!(e.kind, 'i' | 'u' | 'b'),
            "array of {}, expected integers",
            e.name()
        );
        self.data
            .chunks_exact(e.size)
            .map(|c| {
                let mut le = [0u8; 8];
                le[..e.size].copy_from_slice(c);
                if e.order == ByteOrder::Big {
                    le[..e.size].reverse();
                }
                let negative = e.kind == 'i' && le[e.size - 1] & 0x80 != 0;
                if negative {
                    le[e.size..].fill(0xff);
                }
                let v = i64::from_le_bytes(le);
                ensure!(
                    e.kind != 'u' || e.size < 8 || v >= 0,
                    "uint64 element {} does not fit in an int64",
                    u64::from_le_bytes(le)
                );
                Ok(v)
            })
            .collect()
    }
}

/// The globals a numpy pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    Reconstruct,
    NdArray,
    Dtype,
}

impl Global {
    fn python_name(self) -> &'static str {
        match self {
            Global::Reconstruct => "numpy.core.multiarray._reconstruct",
            Global::NdArray => "numpy.ndarray",
            Global::Dtype => "numpy.dtype",
        }
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    match (module, name) {
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
            Ok(Global::Reconstruct)
        }
        ("numpy", "ndarray") => Ok(Global::NdArray),
        ("numpy", "dtype") => Ok(Global::Dtype),
        _ => bail!(
            "refusing global {module}.{name}: only numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype may appear in a numpy pickle (nothing is executed)"
        ),
    }
}

/// A dtype between its call and its BUILD: the BUILD state gives the byte
/// order. Shared, so the copy the memo holds sees the BUILD as Python's
/// object would.
#[derive(Debug)]
pub struct DtypeCell {
    kind: char,
    size: usize,
    order: OnceCell<ByteOrder>,
}

/// What the hooks build. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Numpy {
    Global(Global),
    Dtype(Rc<DtypeCell>),
    /// An array made by `_reconstruct`; its contents arrive with BUILD.
    Array(Rc<OnceCell<NdArray>>),
}

impl Numpy {
    /// The array, once built.
    pub fn array(&self) -> Option<&NdArray> {
        match self {
            Numpy::Array(cell) => cell.get(),
            _ => None,
        }
    }
}

impl pickle::Object for Numpy {
    fn kind(&self) -> String {
        match self {
            Numpy::Global(g) => format!("the global {}", g.python_name()),
            Numpy::Dtype(_) => "a numpy dtype".into(),
            Numpy::Array(cell) => match cell.get() {
                Some(a) => format!("a numpy array of {} {:?}", a.elem.name(), a.shape),
                None => "a numpy array without its data".into(),
            },
        }
    }
}

struct NumpyHooks;

impl Hooks for NumpyHooks {
    type Object = Numpy;

    fn global(&mut self, module: &str, name: &str) -> Result<Numpy> {
        resolve_global(module, name).map(Numpy::Global)
    }

    fn call(&mut self, callable: &Numpy, args: &[Value]) -> Result<Value> {
        let Numpy::Global(global) = callable else {
            bail!(
                "calling {}, not an allowed global",
                pickle::Object::kind(callable)
            )
        };
        match global {
            Global::Reconstruct => reconstruct(args),
            Global::Dtype => new_dtype(args),
            Global::NdArray => bail!("numpy.ndarray is only an argument of _reconstruct"),
        }
    }

    fn python2_string(&mut self, bytes: &[u8]) -> Result<Value> {
        Ok(Value::Bytes(bytes.into()))
    }

    fn build(&mut self, target: &mut Value, state: Value) -> Result<()> {
        match target {
            Value::Object(Numpy::Dtype(d)) => build_dtype(d, &state),
            Value::Object(Numpy::Array(cell)) => {
                let array = build_array(&state)?;
                cell.set(array)
                    .map_err(|_| anyhow!("BUILD of a numpy array that already has its data"))
            }
            other => bail!("BUILD on {} (with state {})", other.kind(), state.kind()),
        }
    }
}

/// The text of a str, or of bytes (a Python 2 str), for short ASCII values.
pub fn text(v: &Value) -> Option<&str> {
    match v {
        Value::Str(s) => Some(s),
        Value::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// `_reconstruct(numpy.ndarray, (0,), b'b')`: an empty array awaiting BUILD.
fn reconstruct(args: &[Value]) -> Result<Value> {
    let [cls, _shape, _typecode] = args else {
        bail!("_reconstruct takes 3 arguments, got {}", args.len())
    };
    ensure!(
        matches!(cls, Value::Object(Numpy::Global(Global::NdArray))),
        "_reconstruct of {}, expected numpy.ndarray",
        cls.kind()
    );
    Ok(Value::Object(Numpy::Array(Rc::new(OnceCell::new()))))
}

/// `numpy.dtype('u1', align, copy)`: kind and size; the order comes with BUILD.
fn new_dtype(args: &[Value]) -> Result<Value> {
    let Some(descr) = args.first() else {
        bail!("numpy.dtype called without arguments")
    };
    let name = text(descr).ok_or_else(|| anyhow!("dtype name is {}", descr.kind()))?;
    let mut chars = name.chars();
    let kind = chars.next().unwrap_or('?');
    let size: Option<usize> = chars.as_str().parse().ok();
    let size = match (kind, size) {
        ('b', Some(1)) | ('i' | 'u', Some(1 | 2 | 4 | 8)) | ('f', Some(2 | 4 | 8)) => size,
        _ => None,
    };
    let size = size.ok_or_else(|| {
        anyhow!("dtype '{name}' is not read (bool, int, uint and float arrays are)")
    })?;
    let order = OnceCell::new();
    if size == 1 {
        let _ = order.set(ByteOrder::Little);
    }
    Ok(Value::Object(Numpy::Dtype(Rc::new(DtypeCell {
        kind,
        size,
        order,
    }))))
}

/// The dtype's state: `(version, order, subarray, names, fields, ...)`.
fn build_dtype(d: &DtypeCell, state: &Value) -> Result<()> {
    let Value::Tuple(t) = state else {
        bail!("dtype state is {}, expected a tuple", state.kind())
    };
    let items = t.items();
    ensure!(
        matches!(items.len(), 8 | 9) && matches!(items[0], Value::Int(3 | 4)),
        "dtype state {} is not numpy's version 3 or 4 (8 or 9 fields)",
        state.kind()
    );
    ensure!(
        items[2..5].iter().all(|v| matches!(v, Value::None)),
        "structured or subarray dtypes are not read"
    );
    let order = match text(&items[1]) {
        Some("<") => ByteOrder::Little,
        Some(">") => ByteOrder::Big,
        Some("|" | "=") if d.size == 1 => ByteOrder::Little,
        Some("=") => native_order(),
        _ => bail!(
            "dtype byte order {} for a {}-byte {} element",
            items[1].kind(),
            d.size,
            d.kind
        ),
    };
    if d.order.get().is_some_and(|&o| o != order) {
        bail!("BUILD of a dtype that already has its byte order");
    }
    let _ = d.order.set(order);
    Ok(())
}

fn native_order() -> ByteOrder {
    if cfg!(target_endian = "big") {
        ByteOrder::Big
    } else {
        ByteOrder::Little
    }
}

/// The array's state: `([version,] shape, dtype, is_fortran, raw bytes)`.
fn build_array(state: &Value) -> Result<NdArray> {
    let Value::Tuple(t) = state else {
        bail!("array state is {}, expected a tuple", state.kind())
    };
    let (shape, dtype, fortran, data) = match t.items() {
        [Value::Int(1), s, d, f, b] | [s, d, f, b] => (s, d, f, b),
        _ => bail!(
            "array state {} is not (version, shape, dtype, is_fortran, data)",
            state.kind()
        ),
    };
    let shape = shape_of(shape).context("array shape")?;
    let Value::Object(Numpy::Dtype(d)) = dtype else {
        bail!("array dtype is {}, expected a numpy dtype", dtype.kind())
    };
    let order = d.order.get().copied().ok_or_else(|| {
        anyhow!(
            "array dtype {}{} has no byte order (no BUILD)",
            d.kind,
            d.size
        )
    })?;
    let elem = ElemType {
        kind: d.kind,
        size: d.size,
        order,
    };
    let is_fortran = matches!(fortran, Value::Bool(true) | Value::Int(1));
    ensure!(
        !is_fortran || shape.iter().filter(|&&n| n > 1).count() <= 1,
        "Fortran-order array of shape {shape:?} is not read (save it C-ordered)"
    );
    let Value::Bytes(data) = data else {
        bail!(
            "array data is {}, expected bytes (object arrays are not read)",
            data.kind()
        )
    };
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(elem.size));
    ensure!(
        count == Some(data.len()),
        "array of {} {shape:?} needs {} bytes, its data has {}",
        elem.name(),
        count.map_or("more than 2^64".into(), |n| n.to_string()),
        data.len()
    );
    Ok(NdArray {
        elem,
        shape,
        data: data.clone(),
    })
}

fn shape_of(v: &Value) -> Result<Vec<usize>> {
    let Value::Tuple(t) = v else {
        bail!("{}, expected a tuple of ints", v.kind())
    };
    t.items()
        .iter()
        .map(|d| match d {
            Value::Int(n) => usize::try_from(*n).map_err(|_| anyhow!("dimension {n}")),
            other => bail!("dimension {}, expected an int", other.kind()),
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod writer {
    //! numpy pickles as Python 2's cPickle writes them (protocol 2, Python
    //! 2 strings), for the tests of this layer and of the CIFAR reader.
    use crate::formats::pickle::writer::P;

    impl P {
        /// A Python 2 str: SHORT_BINSTRING below 256 bytes, else BINSTRING.
        pub(crate) fn str2(self, s: &[u8]) -> Self {
            if s.len() < 256 {
                self.op(b"U").op(&[s.len() as u8]).op(s)
            } else {
                self.op(b"T").op(&(s.len() as u32).to_le_bytes()).op(s)
            }
        }

        /// `descr` ('u1', 'i8') with byte order `order` ('|', '<', '>').
        pub(crate) fn dtype(self, descr: &str, order: &str) -> Self {
            self.global("numpy", "dtype")
                .str2(descr.as_bytes())
                .op(b"K\x00K\x01\x87R")
                .op(b"(K\x03")
                .str2(order.as_bytes())
                .op(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        }

        /// An array of `shape` whose elements are `data` (C order).
        pub(crate) fn array(self, shape: &[usize], descr: &str, order: &str, data: &[u8]) -> Self {
            let p = self
                .global("numpy.core.multiarray", "_reconstruct")
                .global("numpy", "ndarray")
                .op(b"K\x00\x85")
                .str2(b"b")
                .op(b"\x87R(K\x01")
                .ints(shape)
                .dtype(descr, order);
            p.op(&[0x89]).str2(data).op(b"tb")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::pickle::writer::P;

    fn err(bytes: &[u8]) -> String {
        match unpickle(bytes) {
            Ok(v) => panic!("unpickled to {}, expected an error", v.kind()),
            Err(e) => format!("{e:#}"),
        }
    }

    fn array(bytes: &[u8]) -> Rc<OnceCell<NdArray>> {
        match unpickle(bytes).unwrap() {
            Value::Object(Numpy::Array(a)) => a,
            other => panic!("{}", other.kind()),
        }
    }

    #[test]
    fn reads_arrays_as_python2_cpickle_writes_them() {
        let data: Vec<u8> = (0..6).collect();
        let a = array(&P::new().array(&[2, 3], "u1", "|", &data).stop());
        let a = a.get().unwrap();
        assert_eq!(a.shape, [2, 3]);
        assert_eq!(a.as_u8().unwrap(), &data[..]);

        // Little- and big-endian int64, signed values.
        let le: Vec<u8> = [-1i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let be: Vec<u8> = [-1i64, 7].iter().flat_map(|v| v.to_be_bytes()).collect();
        for (order, bytes) in [("<", le), (">", be)] {
            let a = array(&P::new().array(&[2], "i8", order, &bytes).stop());
            assert_eq!(a.get().unwrap().to_i64().unwrap(), [-1, 7]);
        }
        let u16s = array(&P::new().array(&[1], "u2", "<", &[0xff, 0xff]).stop());
        assert_eq!(u16s.get().unwrap().to_i64().unwrap(), [65535]);
    }

    #[test]
    fn bad_arrays_are_errors_naming_what_is_wrong() {
        let e = err(&P::new().array(&[2, 3], "u1", "|", &[0; 5]).stop());
        assert!(e.contains("needs 6 bytes, its data has 5"), "{e}");
        let e = err(&P::new().array(&[2], "U8", "<", &[0; 64]).stop());
        assert!(e.contains("dtype 'U8' is not read"), "{e}");
        let e = err(&P::new().global("numpy", "load").stop());
        assert!(
            e.contains("refusing global numpy.load") && e.contains("nothing is executed"),
            "{e}"
        );
        let e = err(&P::new().global("os", "system").stop());
        assert!(e.contains("refusing global os.system"), "{e}");
        let a = array(&P::new().array(&[1], "f4", "<", &[0; 4]).stop());
        let e = a.get().unwrap().as_u8().unwrap_err().to_string();
        assert!(e.contains("array of <f4, expected uint8"), "{e}");
    }
}
