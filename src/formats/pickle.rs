//! A pickle virtual machine that executes nothing.
//!
//! Python's pickle format is a program for a small stack machine: each
//! opcode pushes a value, pops values into a container, stores or fetches a
//! memo slot, or imports a global (`GLOBAL`, `STACK_GLOBAL`) and calls it
//! (`REDUCE`, `NEWOBJ`). Importing and calling any function is how a
//! malicious pickle runs code on `pickle.load`. This machine builds plain
//! data (None, bools, ints, floats, strings, bytes, tuples, lists, dicts)
//! itself and hands everything else to the caller's [`Hooks`]: a global is
//! only a module and a name, which the hooks accept or refuse; "calling" an
//! accepted one, a persistent id (`BINPERSID`) and `BUILD` are what the
//! hooks make of them, as plain Rust values ([`Object`]). The torch layer
//! (`model::pth`) plugs in tensors and storages this way, the numpy layer
//! (`formats::numpy_pickle`) `numpy.core.multiarray._reconstruct` and
//! `numpy.dtype`. Nothing here knows about either.
//!
//! The opcodes read (protocols 2 to 5, binary only):
//!
//! | opcode | byte | effect |
//! |---|---|---|
//! | `PROTO` | `0x80` | protocol version (at most 5) |
//! | `FRAME` | `0x95` | 8-byte frame length, ignored |
//! | `STOP` | `.` | the top of the stack is the result |
//! | `MARK`, `POP`, `POP_MARK`, `DUP` | `( 0 1 2` | stack handling |
//! | `NONE`, `NEWTRUE`, `NEWFALSE` | `N 0x88 0x89` | constants |
//! | `BININT`, `BININT1`, `BININT2` | `J K M` | 4-, 1-, 2-byte ints |
//! | `LONG1`, `LONG4` | `0x8a 0x8b` | little-endian two's complement (up to 64 bits) |
//! | `BINFLOAT` | `G` | big-endian f64 |
//! | `BINUNICODE`, `SHORT_BINUNICODE`, `BINUNICODE8` | `X 0x8c 0x8d` | UTF-8 strings |
//! | `BINSTRING`, `SHORT_BINSTRING` | `T U` | Python 2 strings: [`Hooks::python2_string`] |
//! | `BINBYTES`, `SHORT_BINBYTES`, `BINBYTES8` | `B C 0x8e` | bytes |
//! | `EMPTY_TUPLE`, `TUPLE1..3`, `TUPLE` | `) 0x85-0x87 t` | tuples |
//! | `EMPTY_LIST`, `LIST`, `APPEND`, `APPENDS` | `] l a e` | lists |
//! | `EMPTY_DICT`, `DICT`, `SETITEM`, `SETITEMS` | `} d s u` | dicts |
//! | `BINPUT`, `LONG_BINPUT`, `MEMOIZE`, `BINGET`, `LONG_BINGET` | `q r 0x94 h j` | the memo |
//! | `GLOBAL`, `STACK_GLOBAL` | `c 0x93` | [`Hooks::global`] |
//! | `REDUCE`, `NEWOBJ` | `R 0x81` | [`Hooks::call`] |
//! | `BINPERSID` | `Q` | [`Hooks::persistent_load`] |
//! | `BUILD` | `b` | [`Hooks::build`] |
//!
//! Not read: the protocol-0 text opcodes, sets, `EXT*`, `NEWOBJ_EX`,
//! `INST`/`OBJ` and out-of-band buffers; each is an error naming the opcode
//! and its position.
//!
//! Every length, count and index read from the stream is checked before
//! use, containers nest at most [`MAX_DEPTH`] deep, and values are shared
//! rather than copied, so a truncated, corrupt or hostile pickle is an error,
//! never a panic, a huge allocation or a quadratic blow-up.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// The deepest nesting of containers accepted. State dicts nest 3 deep,
/// training checkpoints about 5; the limit keeps the recursive drop of a
/// hostile, deeply nested value from overflowing the stack.
pub const MAX_DEPTH: u32 = 100;

/// A value a layer's [`Hooks`] build: an accepted global, a tensor, an
/// array... Cloned on every `DUP` and `BINGET`, so it should be cheap to
/// clone (`Rc` what is large).
pub trait Object: Clone + fmt::Debug {
    /// A short description for error messages ("a tensor", "the global
    /// torch.FloatStorage").
    fn kind(&self) -> String;
}

/// What a format layer makes of the opcodes that, in Python, import and run
/// code. Each method sees plain data and returns plain data; an error is
/// reported with the opcode and its byte position.
pub trait Hooks {
    type Object: Object;

    /// `GLOBAL` / `STACK_GLOBAL`: accept `module.name` as an object, or
    /// refuse it with an error naming it.
    fn global(&mut self, module: &str, name: &str) -> Result<Self::Object>;

    /// `REDUCE` / `NEWOBJ`: the value of `callable(*args)`, where
    /// `callable` is an object this layer built (the machine has checked
    /// that `args` came as a tuple).
    fn call(
        &mut self,
        callable: &Self::Object,
        args: &[Value<Self::Object>],
    ) -> Result<Value<Self::Object>>;

    /// `BINPERSID`: the object a persistent id stands for (torch names its
    /// storages this way). Refused unless the layer has them.
    fn persistent_load(&mut self, pid: &Value<Self::Object>) -> Result<Value<Self::Object>> {
        bail!("persistent id {}: this format has none", pid.kind())
    }

    /// `BINSTRING` / `SHORT_BINSTRING`: a Python 2 `str`, which is bytes
    /// with no stated encoding. By default it is decoded as UTF-8 (what
    /// `torch.load` does); a layer whose Python 2 strings hold binary data
    /// (numpy's array bytes) keeps them as bytes.
    fn python2_string(&mut self, bytes: &[u8]) -> Result<Value<Self::Object>> {
        let text = std::str::from_utf8(bytes).context("string is not UTF-8")?;
        Ok(Value::Str(text.into()))
    }

    /// `BUILD`: set the `state` of `target` (Python's `__setstate__`).
    /// Refused unless the layer knows what the state means.
    fn build(
        &mut self,
        target: &mut Value<Self::Object>,
        state: Value<Self::Object>,
    ) -> Result<()> {
        bail!("BUILD on {} (with state {})", target.kind(), state.kind())
    }
}

/// A pickled value. Everything on the heap is shared, so that BINGET and
/// DUP are O(1) (no quadratic blow-up from a hostile memo); containers are
/// copied on write, which gives value semantics: a memoized container does
/// not see later mutations, a difference from Python that the pickles of
/// data (torch's state dicts, numpy's arrays) never rely on: they memoize
/// each container before filling it and never fetch it again.
#[derive(Clone, Debug)]
pub enum Value<O> {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq<O>>),
    List(Rc<Seq<O>>),
    Dict(Rc<Dict<O>>),
    /// What the layer's hooks built.
    Object(O),
}

/// The items of a tuple or list, with the nesting depth they reach.
#[derive(Clone, Debug)]
pub struct Seq<O> {
    items: Vec<Value<O>>,
    depth: u32,
}

/// Insertion-ordered; string keys are indexed so that a repeated key
/// replaces its value as in Python (other keys are only kept).
#[derive(Clone, Debug)]
pub struct Dict<O> {
    items: Vec<(Value<O>, Value<O>)>,
    index: HashMap<Rc<str>, usize>,
    depth: u32,
}

impl<O: Object> Value<O> {
    /// An empty dict (what `collections.OrderedDict()` builds).
    pub fn new_dict() -> Self {
        Value::Dict(Rc::new(Dict::new()))
    }

    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(s) | Value::List(s) => s.depth,
            Value::Dict(d) => d.depth,
            _ => 0,
        }
    }

    /// A short description for error messages ("a dict of 3", "the int 7").
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(_) => "a str".into(),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Tuple(s) => format!("a tuple of {}", s.items.len()),
            Value::List(s) => format!("a list of {}", s.items.len()),
            Value::Dict(d) => format!("a dict of {}", d.items.len()),
            Value::Object(o) => o.kind(),
        }
    }

    /// The text of a str.
    pub fn str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Depth of a container that holds `child` (and was `current` deep).
fn deeper<O: Object>(current: u32, child: &Value<O>) -> Result<u32> {
    let depth = current.max(child.depth() + 1);
    ensure!(
        depth <= MAX_DEPTH,
        "containers nested more than {MAX_DEPTH} deep"
    );
    Ok(depth)
}

impl<O: Object> Seq<O> {
    /// A tuple's or list's items; an error when they nest too deep.
    pub fn new(items: Vec<Value<O>>) -> Result<Rc<Self>> {
        let mut depth = 1;
        for item in &items {
            depth = deeper(depth, item)?;
        }
        Ok(Rc::new(Seq { items, depth }))
    }

    pub fn items(&self) -> &[Value<O>] {
        &self.items
    }
}

impl<O: Object> Dict<O> {
    pub fn new() -> Self {
        Dict {
            items: Vec::new(),
            index: HashMap::new(),
            depth: 1,
        }
    }

    /// The (key, value) pairs in insertion order.
    pub fn items(&self) -> &[(Value<O>, Value<O>)] {
        &self.items
    }

    /// Set `key` to `value`, replacing the value of an equal str key.
    pub fn insert(&mut self, key: Value<O>, value: Value<O>) -> Result<()> {
        self.depth = deeper(deeper(self.depth.max(1), &key)?, &value)?;
        if let Value::Str(s) = &key {
            if let Some(&i) = self.index.get(s) {
                if let Some(slot) = self.items.get_mut(i) {
                    slot.1 = value;
                    return Ok(());
                }
            }
            self.index.insert(s.clone(), self.items.len());
        }
        self.items.push((key, value));
        Ok(())
    }
}

impl<O: Object> Default for Dict<O> {
    fn default() -> Self {
        Self::new()
    }
}

/// Run the pickle `data` with `hooks` and return the object it builds.
/// Errors name the opcode and the byte it starts at.
pub fn unpickle<H: Hooks>(data: &[u8], hooks: &mut H) -> Result<Value<H::Object>> {
    let mut vm = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        hooks,
    };
    loop {
        let at = vm.pos;
        ensure!(
            at < data.len(),
            "truncated pickle: it ends at byte {at} without a STOP opcode"
        );
        let op = vm.u8()?;
        match vm.step(op) {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => return Err(e.context(format!("opcode {} at byte {at}", opcode_name(op)))),
        }
    }
}

struct Machine<'a, H: Hooks> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value<H::Object>>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value<H::Object>>,
    hooks: &'a mut H,
}

/// "NAME (0xNN)", or "0xNN" for an opcode this machine does not know.
fn opcode_name(op: u8) -> String {
    let name = match op {
        0x80 => "PROTO",
        0x95 => "FRAME",
        b'.' => "STOP",
        b'(' => "MARK",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'}' => "EMPTY_DICT",
        b']' => "EMPTY_LIST",
        b')' => "EMPTY_TUPLE",
        b'd' => "DICT",
        b'l' => "LIST",
        b't' => "TUPLE",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        b'N' => "NONE",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'M' => "BININT2",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'G' => "BINFLOAT",
        b'X' => "BINUNICODE",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8e => "BINBYTES8",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        0x94 => "MEMOIZE",
        b'h' => "BINGET",
        b'j' => "LONG_BINGET",
        b'a' => "APPEND",
        b'e' => "APPENDS",
        b's' => "SETITEM",
        b'u' => "SETITEMS",
        b'c' => "GLOBAL",
        0x93 => "STACK_GLOBAL",
        b'R' => "REDUCE",
        0x81 => "NEWOBJ",
        b'b' => "BUILD",
        b'Q' => "BINPERSID",
        _ => return format!("0x{op:02x}"),
    };
    format!("{name} (0x{op:02x})")
}

impl<'a, H: Hooks> Machine<'a, H> {
    /// Execute one opcode; `Some` at STOP.
    fn step(&mut self, op: u8) -> Result<Option<Value<H::Object>>> {
        match op {
            0x80 => {
                let version = self.u8()?;
                ensure!(version <= 5, "pickle protocol {version} is newer than 5");
            }
            0x95 => {
                self.take(8)?; // framing is only a hint for buffered readers
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => drop(self.pop()?),
            b'1' => drop(self.pop_mark()?),
            b'2' => {
                let top = self.pop()?;
                self.stack.push(top.clone());
                self.stack.push(top);
            }
            b'}' => self.stack.push(Value::new_dict()),
            b']' => self.stack.push(Value::List(Seq::new(Vec::new())?)),
            b')' => self.stack.push(Value::Tuple(Seq::new(Vec::new())?)),
            b'd' => {
                let items = self.pop_mark()?;
                let mut dict = Value::new_dict();
                set_items(&mut dict, items)?;
                self.stack.push(dict);
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::List(Seq::new(items)?));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Seq::new(items)?));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let items = self.pop_n(n)?;
                self.stack.push(Value::Tuple(Seq::new(items)?));
            }
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            0x8a => {
                let n = usize::from(self.u8()?);
                let v = self.long(n)?;
                self.stack.push(Value::Int(v));
            }
            0x8b => {
                let n = self.len32()?;
                let v = self.long(n)?;
                self.stack.push(Value::Int(v));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.array()?);
                self.stack.push(Value::Float(v));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    0x8c => usize::from(self.u8()?),
                    0x8d => self.len64()?,
                    _ => self.len32()?,
                };
                let text = std::str::from_utf8(self.take(n)?).context("string is not UTF-8")?;
                self.stack.push(Value::Str(text.into()));
            }
            b'T' | b'U' => {
                let n = match op {
                    b'U' => usize::from(self.u8()?),
                    _ => self.len32()?,
                };
                let bytes = self.take(n)?;
                let value = self.hooks.python2_string(bytes)?;
                self.stack.push(value);
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'C' => usize::from(self.u8()?),
                    0x8e => self.len64()?,
                    _ => self.len32()?,
                };
                let bytes = self.take(n)?;
                self.stack.push(Value::Bytes(bytes.into()));
            }
            b'q' => {
                let i = self.u8()?;
                self.put(i.into())?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.array()?);
                self.put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len())?;
                self.put(i)?;
            }
            b'h' => {
                let i = self.u8()?;
                self.get(i.into())?;
            }
            b'j' => {
                let i = u32::from_le_bytes(self.array()?);
                self.get(i)?;
            }
            b'a' => {
                let item = self.pop()?;
                self.append(vec![item])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let items = self.pop_n(2)?;
                set_items(self.top_mut()?, items)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                set_items(self.top_mut()?, items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let global = self.hooks.global(module, name)?;
                self.stack.push(Value::Object(global));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let global = match (module.str(), name.str()) {
                    (Some(m), Some(n)) => self.hooks.global(m, n)?,
                    _ => bail!(
                        "expected module and name strings, found {} and {}",
                        module.kind(),
                        name.kind()
                    ),
                };
                self.stack.push(Value::Object(global));
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let Value::Object(callable) = &callable else {
                    bail!("calling {}, not an allowed global", callable.kind())
                };
                let Value::Tuple(args) = &args else {
                    bail!(
                        "arguments of {} are {}, not a tuple",
                        callable.kind(),
                        args.kind()
                    )
                };
                let value = self.hooks.call(callable, args.items())?;
                self.stack.push(value);
            }
            b'b' => {
                let state = self.pop()?;
                ensure!(self.stack.len() > self.floor(), "stack underflow");
                let Some(target) = self.stack.last_mut() else {
                    bail!("stack underflow")
                };
                self.hooks.build(target, state)?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let value = self.hooks.persistent_load(&pid)?;
                self.stack.push(value);
            }
            _ => bail!(
                "unsupported pickle opcode (only the binary opcodes of protocols 2 to 5 that pickled data uses are read)"
            ),
        }
        Ok(None)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| {
            anyhow!(
                "truncated pickle: {n} bytes needed at byte {}, {} left",
                self.pos,
                self.data.len() - self.pos.min(self.data.len())
            )
        })?;
        let data: &'a [u8] = self.data;
        let bytes = &data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into()?)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    fn len32(&mut self) -> Result<usize> {
        Ok(usize::try_from(u32::from_le_bytes(self.array()?))?)
    }

    fn len64(&mut self) -> Result<usize> {
        Ok(usize::try_from(u64::from_le_bytes(self.array()?)).unwrap_or(usize::MAX))
    }

    /// A two's-complement little-endian integer of `n` bytes (LONG1/LONG4).
    fn long(&mut self, n: usize) -> Result<i64> {
        ensure!(n <= 8, "integer of {n} bytes does not fit in 64 bits");
        let bytes = self.take(n)?;
        let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
        let mut full = if negative { [0xff; 8] } else { [0; 8] };
        full[..n].copy_from_slice(bytes);
        Ok(i64::from_le_bytes(full))
    }

    /// A newline-terminated line (GLOBAL's module and name).
    fn line(&mut self) -> Result<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("truncated pickle: unterminated GLOBAL name"))?;
        let line = &rest[..n];
        self.pos += n + 1;
        std::str::from_utf8(line).context("GLOBAL name is not UTF-8")
    }

    /// The bottom of the stack a pop may reach: the last MARK.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value<H::Object>> {
        ensure!(self.stack.len() > self.floor(), "stack underflow");
        self.stack.pop().ok_or_else(|| anyhow!("stack underflow"))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value<H::Object>>> {
        ensure!(
            self.stack.len() >= self.floor() + n,
            "stack underflow: {n} values needed"
        );
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value<H::Object>>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| anyhow!("no MARK on the stack"))?;
        ensure!(mark <= self.stack.len(), "MARK above the stack");
        Ok(self.stack.split_off(mark))
    }

    fn top_mut(&mut self) -> Result<&mut Value<H::Object>> {
        ensure!(self.stack.len() > self.floor(), "stack underflow");
        self.stack
            .last_mut()
            .ok_or_else(|| anyhow!("stack underflow"))
    }

    fn put(&mut self, i: u32) -> Result<()> {
        let top = self.top_mut()?.clone();
        self.memo.insert(i, top);
        Ok(())
    }

    fn get(&mut self, i: u32) -> Result<()> {
        let value = self
            .memo
            .get(&i)
            .cloned()
            .ok_or_else(|| anyhow!("memo entry {i} was never stored"))?;
        self.stack.push(value);
        Ok(())
    }

    fn append(&mut self, items: Vec<Value<H::Object>>) -> Result<()> {
        let Value::List(list) = self.top_mut()? else {
            let kind = self.top_mut()?.kind();
            bail!("APPEND to {kind}, expected a list");
        };
        let list = Rc::make_mut(list);
        for item in items {
            list.depth = deeper(list.depth, &item)?;
            list.items.push(item);
        }
        Ok(())
    }
}

/// SETITEM(S): `items` are key, value, key, value...
fn set_items<O: Object>(target: &mut Value<O>, items: Vec<Value<O>>) -> Result<()> {
    let Value::Dict(dict) = target else {
        bail!("SETITEM on {}, expected a dict", target.kind())
    };
    ensure!(
        items.len().is_multiple_of(2),
        "odd number of values ({}) for key/value pairs",
        items.len()
    );
    let dict = Rc::make_mut(dict);
    let mut items = items.into_iter();
    while let (Some(key), Some(value)) = (items.next(), items.next()) {
        dict.insert(key, value)?;
    }
    Ok(())
}

/// Pickles written opcode by opcode, for the tests of this machine and of
/// the layers on it.
#[cfg(test)]
pub(crate) mod writer {
    /// A pickle (protocol 2) under construction.
    pub(crate) struct P(pub(crate) Vec<u8>);

    impl P {
        pub(crate) fn new() -> Self {
            P(vec![0x80, 2])
        }
        pub(crate) fn op(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }
        pub(crate) fn global(self, module: &str, name: &str) -> Self {
            self.op(b"c")
                .op(module.as_bytes())
                .op(b"\n")
                .op(name.as_bytes())
                .op(b"\n")
        }
        pub(crate) fn str(self, s: &str) -> Self {
            let len = (s.len() as u32).to_le_bytes();
            self.op(b"X").op(&len).op(s.as_bytes())
        }
        pub(crate) fn int(self, i: i32) -> Self {
            self.op(b"J").op(&i.to_le_bytes())
        }
        pub(crate) fn ints(self, v: &[usize]) -> Self {
            v.iter()
                .fold(self.op(b"("), |p, &i| p.int(i as i32))
                .op(b"t")
        }
        pub(crate) fn stop(self) -> Vec<u8> {
            self.op(b".").0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::writer::P;
    use super::*;

    /// A layer with one global, `test.point`, whose call builds a
    /// point; persistent ids and BUILD are refused as by default.
    struct Points;

    #[derive(Clone, Debug, PartialEq)]
    enum Obj {
        PointType,
        Point(i64, i64),
    }

    impl Object for Obj {
        fn kind(&self) -> String {
            match self {
                Obj::PointType => "the global test.point".into(),
                Obj::Point(..) => "a point".into(),
            }
        }
    }

    impl Hooks for Points {
        type Object = Obj;

        fn global(&mut self, module: &str, name: &str) -> Result<Obj> {
            match (module, name) {
                ("test", "point") => Ok(Obj::PointType),
                _ => bail!("refusing global {module}.{name}"),
            }
        }

        fn call(&mut self, callable: &Obj, args: &[Value<Obj>]) -> Result<Value<Obj>> {
            match (callable, args) {
                (Obj::PointType, [Value::Int(x), Value::Int(y)]) => {
                    Ok(Value::Object(Obj::Point(*x, *y)))
                }
                _ => bail!("bad call of {}", callable.kind()),
            }
        }
    }

    /// Only plain data: every global, persistent id and BUILD is refused.
    struct Plain;

    impl Hooks for Plain {
        type Object = Obj;

        fn global(&mut self, module: &str, name: &str) -> Result<Obj> {
            bail!("refusing global {module}.{name}")
        }

        fn call(&mut self, callable: &Obj, _: &[Value<Obj>]) -> Result<Value<Obj>> {
            bail!("calling {}", callable.kind())
        }
    }

    fn unpickle_err(bytes: &[u8]) -> String {
        match unpickle(bytes, &mut Plain) {
            Ok(v) => panic!("unpickled to {}, expected an error", v.kind()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn malformed_streams_are_errors() {
        let e = unpickle_err(b"\x80\x02\xff.");
        assert!(
            e.contains("opcode 0xff at byte 2") && e.contains("unsupported pickle opcode"),
            "{e}"
        );
        assert!(unpickle_err(b"\x80\x02s.").contains("underflow"));
        assert!(
            unpickle_err(b"\x80\x02(}u.").contains("underflow"),
            "values below a MARK are out of reach"
        );
        assert!(unpickle_err(b"\x80\x02h\x07.").contains("memo entry 7"));
        assert!(
            unpickle_err(b"\x80\x02X\xff\xff\xff\xff").contains("truncated"),
            "a huge length is not allocated"
        );
        assert!(
            unpickle_err(b"\x80\x02\x8a\x09\x01\x01\x01\x01\x01\x01\x01\x01\x01.")
                .contains("64 bits")
        );
        assert!(unpickle_err(b"\x80\x02N]a.").contains("APPEND to None"));
        assert!(unpickle_err(b"\x80\x02\x80\x09.").contains("protocol 9"));
        let deep = [&b"\x80\x02)"[..], &[0x85; 1000], b"."].concat();
        assert!(unpickle_err(&deep).contains("nested"));
    }

    #[test]
    fn pickle_values() {
        // LONG1 sign extension, BININT2, BINFLOAT, MEMOIZE/BINGET, dict key replacement.
        let p = P::new()
            .op(b"}(")
            .str("a")
            .op(b"\x8a\x02\x00\xff")
            .str("b")
            .op(b"M\x34\x12")
            .str("c")
            .op(b"G\x3f\xe0\0\0\0\0\0\0\x94")
            .str("a")
            .op(b"h\x00u.");
        let Ok(Value::Dict(d)) = unpickle(&p.0, &mut Plain) else {
            panic!("not a dict")
        };
        let got: Vec<String> = d
            .items()
            .iter()
            .map(|(k, v)| format!("{}: {}", k.str().unwrap(), v.kind()))
            .collect();
        assert_eq!(
            got,
            ["a: the float 0.5", "b: the int 4660", "c: the float 0.5"]
        );
        let Ok(Value::Int(i)) = unpickle(b"\x80\x02\x8a\x02\x00\xff.", &mut Plain) else {
            panic!()
        };
        assert_eq!(i, -256);
    }

    /// A list of a few plain values: (), [1, 'x', None, b'\x01\x02'], {'k': True}.
    fn plain_stream() -> Vec<u8> {
        P::new()
            .op(b"](")
            .op(b")")
            .op(b"](")
            .int(1)
            .str("x")
            .op(b"NC\x02\x01\x02e")
            .op(b"}")
            .str("k")
            .op(&[0x88])
            .op(b"se")
            .stop()
    }

    #[test]
    fn every_truncation_of_plain_data_is_an_error() {
        let full = plain_stream();
        let Ok(Value::List(l)) = unpickle(&full, &mut Plain) else {
            panic!("not a list")
        };
        let kinds: Vec<String> = l.items().iter().map(Value::kind).collect();
        assert_eq!(kinds, ["a tuple of 0", "a list of 4", "a dict of 1"]);
        for n in 0..full.len() {
            let e = unpickle_err(&full[..n]);
            assert!(
                e.contains("truncated") || e.contains("underflow") || e.contains("MARK"),
                "{n}: {e}"
            );
        }
    }

    #[test]
    fn globals_calls_and_the_rest_go_through_the_hooks() {
        // GLOBAL and STACK_GLOBAL are named to the hooks, which refuse.
        let e = unpickle_err(&P::new().global("builtins", "eval").stop());
        assert!(
            e.contains("refusing global builtins.eval") && e.contains("GLOBAL (0x63) at byte 2"),
            "{e}"
        );
        let e = unpickle_err(&P::new().str("os").str("system").op(&[0x93]).stop());
        assert!(e.contains("os.system") && e.contains("STACK_GLOBAL"), "{e}");
        let e = unpickle_err(&P::new().int(1).str("system").op(&[0x93]).stop());
        assert!(e.contains("expected module and name strings"), "{e}");

        // An accepted global is called with its tuple of arguments.
        let point = P::new()
            .global("test", "point")
            .int(3)
            .int(-4)
            .op(&[0x86, b'R']);
        let v = unpickle(&point.op(b".").0, &mut Points).unwrap();
        assert!(matches!(v, Value::Object(Obj::Point(3, -4))), "{v:?}");
        let e = format!(
            "{:#}",
            unpickle(
                &P::new().global("test", "point").int(3).op(b"R.").0,
                &mut Points
            )
            .unwrap_err()
        );
        assert!(
            e.contains("arguments of the global test.point are the int 3, not a tuple"),
            "{e}"
        );
        let e = unpickle_err(&P::new().int(3).op(b")R").stop());
        assert!(
            e.contains("calling the int 3, not an allowed global"),
            "{e}"
        );

        // Persistent ids and BUILD are refused unless a layer takes them.
        let e = unpickle_err(&P::new().str("key").op(b"Q").stop());
        assert!(
            e.contains("persistent id a str") && e.contains("BINPERSID"),
            "{e}"
        );
        let e = unpickle_err(&P::new().op(b"}}b").stop());
        assert!(
            e.contains("BUILD on a dict of 0 (with state a dict of 0)"),
            "{e}"
        );
    }

    #[test]
    fn python2_strings_are_utf8_unless_a_layer_says_otherwise() {
        let Ok(Value::Str(s)) = unpickle(b"\x80\x02U\x02hi.", &mut Plain) else {
            panic!("not a str")
        };
        assert_eq!(&*s, "hi");
        let e = unpickle_err(b"\x80\x02T\x01\x00\x00\x00\xff.");
        assert!(e.contains("not UTF-8") && e.contains("BINSTRING"), "{e}");
    }

    #[test]
    fn memoized_values_are_shared_not_copied() {
        // A list memoized, then fetched and DUP'ed many times: each is O(1).
        let mut p = P::new().op(b"](").int(7).op(b"eq\x00(");
        for _ in 0..10_000 {
            p = p.op(b"h\x00");
        }
        let v = unpickle(&p.op(b"l.").0, &mut Plain).unwrap();
        let Value::List(l) = v else { panic!() };
        assert_eq!(l.items().len(), 10_000);
        assert!(l.items().iter().all(|v| v.kind() == "a list of 1"));
    }
}
