//! Reading PyTorch's *legacy* (non-zip, `torch.save(..., _use_new_zipfile_serialization=False)`
//! and everything saved before torch 1.6) checkpoints without torch or Python.
//!
//! A legacy checkpoint is five pickles back to back followed by raw storage data:
//!
//! 1. the magic number `0x1950a86a20f9469cfc6c`;
//! 2. the protocol version `1001`;
//! 3. a `sys_info` dict (`little_endian` must be true);
//! 4. the object itself: here a state dict, an `OrderedDict` of parameter name to tensor, where
//!    each tensor is a `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
//!    ...)` call (or `_rebuild_tensor`, or wrapped in `_rebuild_parameter`) whose storage is the
//!    persistent id `('storage', torch.FloatStorage, key, location, numel, view_metadata)`;
//! 5. the list of storage keys in file order;
//!
//! then, for each key in that order, an 8-byte little-endian element count and the elements,
//! little-endian.
//!
//! The pickle machine is small: it covers the protocol 0–2 binary opcodes that `torch.save`
//! emits (`PROTO`, `STOP`, `MARK`, `POP`, `POP_MARK`, `DUP`, `NONE`, `NEWTRUE`, `NEWFALSE`,
//! `BININT`, `BININT1`, `BININT2`, `LONG1`, `LONG4`, `BINFLOAT`, `BINUNICODE`, `BINSTRING`,
//! `SHORT_BINSTRING`, `EMPTY_DICT`, `DICT`, `EMPTY_LIST`, `LIST`, `EMPTY_TUPLE`, `TUPLE`,
//! `TUPLE1`–`TUPLE3`, `APPEND`, `APPENDS`, `SETITEM`, `SETITEMS`, `BINPUT`, `LONG_BINPUT`,
//! `BINGET`, `LONG_BINGET`, `GLOBAL`, `REDUCE`, `BUILD`, `BINPERSID`, `NEWOBJ`) plus a few later
//! ones that cost nothing (`FRAME`, `MEMOIZE`, `SHORT_BINUNICODE`, `BINUNICODE8`, `BINBYTES`,
//! `SHORT_BINBYTES`, `STACK_GLOBAL`). Any other opcode is an error naming the byte and its offset.
//! No code is ever run: `GLOBAL`s are only names, and the only calls given a meaning are
//! `collections.OrderedDict()`, the tensor rebuild functions and the storage persistent ids;
//! every other call stays an opaque object.
//!
//! Containers live in an arena and values refer to them by index, so deeply nested or
//! self-referencing input can neither overflow the stack nor blow up memory, and every length read
//! from the input is checked against the bytes that remain before anything is allocated.
//!
//! **The state dict.** The top-level dict is the state dict when it holds tensors; otherwise the
//! dict under the first of `state_dict`, `model_state_dict`, `model` or `net` is taken (up to
//! three levels). Every entry of the state dict must be a string key with a tensor value.
//!
//! **Conversions.** Every tensor comes back as `f32` in row-major order whatever its strides
//! (EfficientNet-Lite0's convolution weights, converted from TensorFlow, are stored permuted):
//! `FloatStorage` as is; `DoubleStorage`, `HalfStorage` and `BFloat16Storage` rounded to `f32`;
//! the integer storages (`LongStorage` as used by BatchNorm's `num_batches_tracked`,
//! `IntStorage`, `ShortStorage`, `CharStorage`, `ByteStorage`) and `BoolStorage` (0 or 1)
//! converted with `as f32`, so integers above 2^24 lose precision. Complex and quantised
//! storages are an error. A tensor may not have more elements than its storage (overlapping,
//! e.g. zero, strides are refused), and all tensors together may not hold more than four times
//! the elements of all storages (tensors sharing a storage are each copied out).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;

/// One tensor of a checkpoint, as f32, in row-major (C) order.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointTensor {
    /// Size of each dimension (empty for a 0-d tensor, which holds one value).
    pub shape: Vec<usize>,
    /// The elements, row-major; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

/// A legacy PyTorch checkpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read.
    #[error("reading checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is a zip archive: the serialisation of torch 1.6 and later, which this reader does
    /// not handle.
    #[error(
        "checkpoint {origin} is a zip-format PyTorch file (torch >= 1.6); only the legacy format is supported"
    )]
    ZipFormat {
        /// The file.
        origin: String,
    },
    /// The file does not start with the legacy magic number.
    #[error(
        "checkpoint {origin} is not a legacy PyTorch file: expected magic number 0x1950a86a20f9469cfc6c, found {found}"
    )]
    BadMagic {
        /// The file.
        origin: String,
        /// What was there instead.
        found: String,
    },
    /// The serialisation protocol version is not 1001.
    #[error("checkpoint {origin}: expected serialisation protocol version 1001, found {found}")]
    ProtocolVersion {
        /// The file.
        origin: String,
        /// What was there instead.
        found: String,
    },
    /// The input ended early.
    #[error(
        "checkpoint {origin} is truncated: needed {needed} byte(s) for {what} at offset {offset}, only {available} left"
    )]
    Truncated {
        /// The file.
        origin: String,
        /// What was being read.
        what: String,
        /// Byte offset in the file where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: u64,
        /// Bytes that remain.
        available: usize,
    },
    /// A pickle opcode this reader does not implement.
    #[error(
        "checkpoint {origin}: unsupported pickle opcode 0x{opcode:02x} ({printable}) at offset {offset}"
    )]
    UnknownOpcode {
        /// The file.
        origin: String,
        /// The opcode byte.
        opcode: u8,
        /// The byte as a character, as pickletools shows it.
        printable: char,
        /// Byte offset in the file.
        offset: usize,
    },
    /// A pickle is malformed (stack underflow, wrong operand type, unknown memo entry...).
    #[error("checkpoint {origin}: malformed pickle at offset {offset}: {message}")]
    Pickle {
        /// The file.
        origin: String,
        /// Byte offset of the opcode in the file.
        offset: usize,
        /// What was expected and what was found.
        message: String,
    },
    /// The pickles are well formed but not laid out as a legacy checkpoint (storages missing or
    /// of the wrong size, big-endian data...).
    #[error("checkpoint {origin}: {message}")]
    Layout {
        /// The file.
        origin: String,
        /// What was expected and what was found.
        message: String,
    },
    /// The object is not a state dict (or a dict wrapping one).
    #[error("checkpoint {origin} does not hold a state dict: {message}")]
    NotAStateDict {
        /// The file.
        origin: String,
        /// What was found.
        message: String,
    },
    /// One tensor cannot be read.
    #[error("checkpoint {origin}, tensor '{key}': {message}")]
    Tensor {
        /// The file.
        origin: String,
        /// The parameter name.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Reads the state dict (parameter name -> tensor) of a legacy PyTorch checkpoint.
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, CheckpointTensor>, CheckpointError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: origin.clone(),
        source,
    })?;
    parse_state_dict(&bytes, &origin)
}

/// Same, from bytes (the path is only used in error messages).
pub fn parse_state_dict(
    bytes: &[u8],
    origin: &str,
) -> Result<BTreeMap<String, CheckpointTensor>, CheckpointError> {
    Reader { bytes, origin }.state_dict()
}

/// The legacy magic number, `0x1950a86a20f9469cfc6c`.
const MAGIC: i128 = 0x1950a86a20f9469cfc6c;
/// The legacy serialisation protocol version.
const PROTOCOL_VERSION: i128 = 1001;
/// Keys under which a checkpoint may wrap its state dict, in order of preference.
const WRAPPER_KEYS: [&str; 4] = ["state_dict", "model_state_dict", "model", "net"];
/// How many wrapping dicts are looked through.
const MAX_WRAPPING: usize = 3;
/// The tensors may hold at most this many times the elements of all storages together.
const OUTPUT_BUDGET_FACTOR: usize = 4;

// ---------------------------------------------------------------------------------------------
// Values of the pickle machine

/// A pickled value. Containers live in the machine's arena and are referred to by index, which
/// keeps values small and cheap to clone, makes sharing through the memo exact, and means
/// dropping or inspecting a value never recurses.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i128),
    /// An integer too large for `i128`; only its size is kept.
    BigInt(usize),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    /// `module.name`, never resolved.
    Global(Rc<str>, Rc<str>),
    /// A storage from a persistent id.
    Storage(Rc<StorageRef>),
    /// A rebuilt tensor (index into `Machine::tensors`).
    Tensor(usize),
    /// A container (index into `Machine::arena`).
    Obj(usize),
}

impl Value {
    /// A short description for error messages.
    fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {}", if *b { "True" } else { "False" }),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt(n) => format!("{n}-byte int"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => format!("str {:?}", truncate(s)),
            Value::Bytes(b) => format!("{} bytes", b.len()),
            Value::Global(m, n) => format!("global {m}.{n}"),
            Value::Storage(s) => format!("storage '{}'", s.key),
            Value::Tensor(_) => "tensor".into(),
            Value::Obj(_) => "container".into(),
        }
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// A container in the arena.
#[derive(Debug)]
enum Obj {
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict or `OrderedDict`, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A call (`REDUCE`, `NEWOBJ`) that is kept opaque.
    Call(Value),
}

impl Obj {
    fn kind(&self) -> String {
        match self {
            Obj::List(v) => format!("list of {}", v.len()),
            Obj::Tuple(v) => format!("tuple of {}", v.len()),
            Obj::Dict(v) => format!("dict of {}", v.len()),
            Obj::Call(Value::Global(m, n)) => format!("{m}.{n}(...) object"),
            Obj::Call(_) => "object".into(),
        }
    }
}

/// Element type of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// Complex storages: their size is known (so the data can be skipped) but tensors of them are
    /// an error.
    Complex64,
    Complex128,
}

impl Dtype {
    fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Dtype::F32,
            "DoubleStorage" => Dtype::F64,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::Bf16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            "ComplexFloatStorage" => Dtype::Complex64,
            "ComplexDoubleStorage" => Dtype::Complex128,
            _ => return None,
        })
    }

    const fn size(self) -> usize {
        match self {
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::F16 | Dtype::Bf16 | Dtype::I16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::Complex64 => 8,
            Dtype::Complex128 => 16,
        }
    }
}

/// A storage as a persistent id names it: a root storage, or a view into one.
#[derive(Debug)]
struct StorageRef {
    /// Key of the root storage (the one whose data is in the file).
    key: Rc<str>,
    dtype: Dtype,
    /// Element offset of this (view) storage within the root.
    offset: usize,
    /// Elements of this (view) storage.
    len: usize,
}

/// A `_rebuild_tensor_v2` call.
#[derive(Debug)]
struct TensorSpec {
    storage: Rc<StorageRef>,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

// ---------------------------------------------------------------------------------------------
// The pickle machine

/// Runs one pickle. Offsets in errors are file offsets.
struct Machine<'a> {
    bytes: &'a [u8],
    origin: &'a str,
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    arena: Vec<Obj>,
    tensors: Vec<TensorSpec>,
    /// Root storages named by persistent ids: key -> (dtype, elements).
    storages: HashMap<Rc<str>, (Dtype, usize)>,
    /// Offset of the opcode being run.
    op_offset: usize,
}

impl<'a> Machine<'a> {
    fn new(bytes: &'a [u8], origin: &'a str, pos: usize) -> Self {
        Machine {
            bytes,
            origin,
            pos,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            arena: Vec::new(),
            tensors: Vec::new(),
            storages: HashMap::new(),
            op_offset: pos,
        }
    }

    fn malformed(&self, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Pickle {
            origin: self.origin.to_string(),
            offset: self.op_offset,
            message: message.into(),
        }
    }

    /// The next `n` bytes of the input.
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], CheckpointError> {
        let available = self.bytes.len().saturating_sub(self.pos);
        match usize::try_from(n) {
            Ok(n) if n <= available => {
                let start = self.pos;
                self.pos += n;
                Ok(&self.bytes[start..start + n])
            }
            _ => Err(CheckpointError::Truncated {
                origin: self.origin.to_string(),
                what: what.to_string(),
                offset: self.pos,
                needed: n,
                available,
            }),
        }
    }

    fn take_array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], CheckpointError> {
        let slice = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, CheckpointError> {
        Ok(self.take_array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.take_array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.take_array(what)?))
    }

    /// A newline-terminated line (for `GLOBAL`).
    fn line(&mut self, what: &str) -> Result<&'a str, CheckpointError> {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(CheckpointError::Truncated {
                origin: self.origin.to_string(),
                what: format!("{what} (no newline)"),
                offset: self.pos,
                needed: rest.len() as u64 + 1,
                available: rest.len(),
            });
        };
        let line = &rest[..end];
        self.pos += end + 1;
        std::str::from_utf8(line).map_err(|_| self.malformed(format!("{what} is not UTF-8")))
    }

    fn push_obj(&mut self, obj: Obj) -> Value {
        self.arena.push(obj);
        Value::Obj(self.arena.len() - 1)
    }

    fn pop(&mut self) -> Result<Value, CheckpointError> {
        // Items below the innermost mark belong to an enclosing frame.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&self) -> Result<&Value, CheckpointError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        self.stack
            .last()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    /// The items pushed since the last `MARK`, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, CheckpointError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to"))?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn obj(&self, value: &Value) -> Option<&Obj> {
        match value {
            Value::Obj(i) => self.arena.get(*i),
            _ => None,
        }
    }

    fn obj_index(&self, value: &Value, expected: &str) -> Result<usize, CheckpointError> {
        match value {
            Value::Obj(i) if *i < self.arena.len() => Ok(*i),
            other => {
                Err(self.malformed(format!("expected {expected}, found {}", other.describe())))
            }
        }
    }

    fn tuple(&self, value: &Value, what: &str) -> Result<&[Value], CheckpointError> {
        match self.obj(value) {
            Some(Obj::Tuple(items)) => Ok(items),
            Some(obj) => Err(self.malformed(format!(
                "expected a tuple for {what}, found a {}",
                obj.kind()
            ))),
            None => Err(self.malformed(format!(
                "expected a tuple for {what}, found {}",
                value.describe()
            ))),
        }
    }

    fn extend_list(&mut self, list: &Value, items: Vec<Value>) -> Result<(), CheckpointError> {
        let index = self.obj_index(list, "a list to append to")?;
        match &mut self.arena[index] {
            Obj::List(v) => {
                v.extend(items);
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.malformed(format!("expected a list to append to, found a {kind}")))
            }
        }
    }

    fn set_items(&mut self, dict: &Value, items: Vec<Value>) -> Result<(), CheckpointError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed(format!(
                "SETITEMS with an odd number ({}) of items",
                items.len()
            )));
        }
        let index = self.obj_index(dict, "a dict to set items in")?;
        match &mut self.arena[index] {
            Obj::Dict(entries) => {
                let mut items = items.into_iter();
                while let (Some(k), Some(v)) = (items.next(), items.next()) {
                    // Later values replace earlier ones, as in Python.
                    let existing = entries.iter().position(|(old, _)| keys_equal(old, &k));
                    match existing {
                        Some(i) => entries[i].1 = v,
                        None => entries.push((k, v)),
                    }
                }
                Ok(())
            }
            other => {
                let kind = other.kind();
                Err(self.malformed(format!("expected a dict to set items in, found a {kind}")))
            }
        }
    }

    fn int(&self, value: &Value, what: &str) -> Result<usize, CheckpointError> {
        match value {
            Value::Int(i) => usize::try_from(*i).map_err(|_| {
                self.malformed(format!("{what} must be a non-negative int, found {i}"))
            }),
            other => Err(self.malformed(format!(
                "expected an int for {what}, found {}",
                other.describe()
            ))),
        }
    }

    fn ints(&self, value: &Value, what: &str) -> Result<Vec<usize>, CheckpointError> {
        self.tuple(value, what)?
            .iter()
            .map(|v| self.int(v, what))
            .collect()
    }

    /// Resolves a persistent id: `('storage', torch.XStorage, key, location, numel,
    /// view_metadata)`.
    fn persistent_load(&mut self, pid: &Value) -> Result<Value, CheckpointError> {
        let items = self.tuple(pid, "a persistent id")?;
        let [tag, storage_type, key, _location, numel, rest @ ..] = items else {
            return Err(self.malformed(format!(
                "expected a persistent id ('storage', type, key, location, numel, view), found a tuple of {}",
                items.len()
            )));
        };
        if !matches!(tag, Value::Str(s) if &**s == "storage") {
            return Err(self.malformed(format!(
                "expected a persistent id tagged 'storage', found {}",
                tag.describe()
            )));
        }
        let dtype = match storage_type {
            Value::Global(module, name) if &**module == "torch" => Dtype::from_storage_name(name)
                .ok_or_else(|| {
                self.malformed(format!("unsupported storage type torch.{name}"))
            })?,
            other => {
                return Err(self.malformed(format!(
                    "expected a torch storage type, found {}",
                    other.describe()
                )));
            }
        };
        let Value::Str(key) = key else {
            return Err(self.malformed(format!(
                "expected a str storage key, found {}",
                key.describe()
            )));
        };
        let key = key.clone();
        let numel = self.int(numel, "the storage size")?;
        let view = rest.first().cloned().unwrap_or(Value::None);
        let storage = match &view {
            Value::None => StorageRef {
                key: key.clone(),
                dtype,
                offset: 0,
                len: numel,
            },
            view => {
                let items = self.tuple(view, "storage view metadata")?;
                let [_view_key, offset, len] = items else {
                    return Err(self.malformed(format!(
                        "expected storage view metadata (view_key, offset, size), found a tuple of {}",
                        items.len()
                    )));
                };
                let offset = self.int(offset, "the storage view offset")?;
                let len = self.int(len, "the storage view size")?;
                if offset.checked_add(len).is_none_or(|end| end > numel) {
                    return Err(self.malformed(format!(
                        "storage view [{offset}, +{len}) lies outside storage '{key}' of {numel} elements"
                    )));
                }
                StorageRef {
                    key: key.clone(),
                    dtype,
                    offset,
                    len,
                }
            }
        };
        match self.storages.get(&key) {
            Some(&(d, n)) if d != dtype || n != numel => {
                return Err(self.malformed(format!(
                    "storage '{key}' named twice with different types or sizes ({d:?} x {n}, then {dtype:?} x {numel})"
                )));
            }
            Some(_) => {}
            None => {
                self.storages.insert(key, (dtype, numel));
            }
        }
        Ok(Value::Storage(Rc::new(storage)))
    }

    /// `callable(*args)`, for the few callables that have a meaning here.
    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value, CheckpointError> {
        let name = match &callable {
            Value::Global(m, n) => Some((m.clone(), n.clone())),
            _ => None,
        };
        let Some((module, name)) = name else {
            return Ok(self.push_obj(Obj::Call(callable)));
        };
        match (&*module, &*name) {
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict")
                if self.tuple(&args, "dict arguments")?.is_empty() =>
            {
                Ok(self.push_obj(Obj::Dict(Vec::new())))
            }
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                let items = self.tuple(&args, "tensor rebuild arguments")?;
                let [storage, offset, size, stride, ..] = items else {
                    return Err(self.malformed(format!(
                        "{name} expects (storage, storage_offset, size, stride, ...), found a tuple of {}",
                        items.len()
                    )));
                };
                let Value::Storage(storage) = storage else {
                    return Err(self.malformed(format!(
                        "expected a storage for {name}, found {}",
                        storage.describe()
                    )));
                };
                let spec = TensorSpec {
                    storage: storage.clone(),
                    offset: self.int(offset, "the storage offset")?,
                    size: self.ints(size, "the tensor size")?,
                    stride: self.ints(stride, "the tensor stride")?,
                };
                if spec.size.len() != spec.stride.len() {
                    return Err(self.malformed(format!(
                        "tensor size {:?} and stride {:?} differ in rank",
                        spec.size, spec.stride
                    )));
                }
                self.tensors.push(spec);
                Ok(Value::Tensor(self.tensors.len() - 1))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match self.tuple(&args, "parameter rebuild arguments")?.first() {
                    Some(tensor @ Value::Tensor(_)) => Ok(tensor.clone()),
                    other => Err(self.malformed(format!(
                        "expected a tensor for {name}, found {}",
                        other.map_or_else(|| "nothing".into(), Value::describe)
                    ))),
                }
            }
            _ => Ok(self.push_obj(Obj::Call(callable))),
        }
    }

    /// Runs until `STOP` and returns the value on top of the stack; `pos` is then just after the
    /// `STOP`.
    fn run(&mut self) -> Result<Value, CheckpointError> {
        loop {
            self.op_offset = self.pos;
            let op = self.u8("a pickle opcode")?;
            match op {
                // PROTO
                0x80 => {
                    let version = self.u8("the PROTO version")?;
                    if version > 5 {
                        return Err(
                            self.malformed(format!("unsupported pickle protocol {version}"))
                        );
                    }
                }
                // FRAME: framing is only a hint to buffered readers
                0x95 => {
                    self.u64("the FRAME length")?;
                }
                // STOP
                b'.' => {
                    let value = self.pop()?;
                    return Ok(value);
                }
                // MARK
                b'(' => self.marks.push(self.stack.len()),
                // POP
                b'0' => {
                    // POP with nothing above the mark pops the mark, as Python does.
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() > floor || self.marks.is_empty() {
                        self.pop()?;
                    } else {
                        self.pop_mark()?;
                    }
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark()?;
                }
                // DUP
                b'2' => {
                    let top = self.top()?.clone();
                    self.stack.push(top);
                }
                // NONE
                b'N' => self.stack.push(Value::None),
                // NEWTRUE, NEWFALSE
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                // BININT
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array("a BININT")?);
                    self.stack.push(Value::Int(v.into()));
                }
                // BININT1
                b'K' => {
                    let v = self.u8("a BININT1")?;
                    self.stack.push(Value::Int(v.into()));
                }
                // BININT2
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array("a BININT2")?);
                    self.stack.push(Value::Int(v.into()));
                }
                // LONG1, LONG4
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        u64::from(self.u8("the LONG1 length")?)
                    } else {
                        let n = i32::from_le_bytes(self.take_array("the LONG4 length")?);
                        u64::try_from(n)
                            .map_err(|_| self.malformed(format!("negative LONG4 length {n}")))?
                    };
                    let digits = self.take(n, "a long integer")?;
                    self.stack.push(long_from_le(digits));
                }
                // BINFLOAT (big-endian)
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array("a BINFLOAT")?);
                    self.stack.push(Value::Float(v));
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u64::from(self.u32("the BINUNICODE length")?),
                        0x8c => u64::from(self.u8("the SHORT_BINUNICODE length")?),
                        _ => self.u64("the BINUNICODE8 length")?,
                    };
                    let raw = self.take(n, "a unicode string")?;
                    let s = std::str::from_utf8(raw)
                        .map_err(|_| self.malformed("string is not valid UTF-8"))?;
                    self.stack.push(Value::Str(Rc::from(s)));
                }
                // BINSTRING, SHORT_BINSTRING (Python 2 str: text when it is UTF-8)
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = i32::from_le_bytes(self.take_array("the BINSTRING length")?);
                        u64::try_from(n)
                            .map_err(|_| self.malformed(format!("negative BINSTRING length {n}")))?
                    } else {
                        u64::from(self.u8("the SHORT_BINSTRING length")?)
                    };
                    let raw = self.take(n, "a string")?;
                    self.stack.push(match std::str::from_utf8(raw) {
                        Ok(s) => Value::Str(Rc::from(s)),
                        Err(_) => Value::Bytes(Rc::from(raw)),
                    });
                }
                // BINBYTES, SHORT_BINBYTES
                b'B' | b'C' => {
                    let n = if op == b'B' {
                        u64::from(self.u32("the BINBYTES length")?)
                    } else {
                        u64::from(self.u8("the SHORT_BINBYTES length")?)
                    };
                    let raw = self.take(n, "bytes")?;
                    self.stack.push(Value::Bytes(Rc::from(raw)));
                }
                // EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE
                b'}' => {
                    let v = self.push_obj(Obj::Dict(Vec::new()));
                    self.stack.push(v);
                }
                b']' => {
                    let v = self.push_obj(Obj::List(Vec::new()));
                    self.stack.push(v);
                }
                b')' => {
                    let v = self.push_obj(Obj::Tuple(Vec::new()));
                    self.stack.push(v);
                }
                // DICT, LIST, TUPLE
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = self.push_obj(Obj::Dict(Vec::new()));
                    self.set_items(&dict, items)?;
                    self.stack.push(dict);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    let v = self.push_obj(Obj::List(items));
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.push_obj(Obj::Tuple(items));
                    self.stack.push(v);
                }
                // TUPLE1, TUPLE2, TUPLE3
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.push_obj(Obj::Tuple(items));
                    self.stack.push(v);
                }
                // APPEND
                b'a' => {
                    let item = self.pop()?;
                    let list = self.top()?.clone();
                    self.extend_list(&list, vec![item])?;
                }
                // APPENDS
                b'e' => {
                    let items = self.pop_mark()?;
                    let list = self.top()?.clone();
                    self.extend_list(&list, items)?;
                }
                // SETITEM
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?.clone();
                    self.set_items(&dict, vec![key, value])?;
                }
                // SETITEMS
                b'u' => {
                    let items = self.pop_mark()?;
                    let dict = self.top()?.clone();
                    self.set_items(&dict, items)?;
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' | b'r' | 0x94 => {
                    let index = match op {
                        b'q' => u32::from(self.u8("the BINPUT index")?),
                        b'r' => self.u32("the LONG_BINPUT index")?,
                        _ => u32::try_from(self.memo.len())
                            .map_err(|_| self.malformed("memo too large"))?,
                    };
                    let top = self.top()?.clone();
                    self.memo.insert(index, top);
                }
                // BINGET, LONG_BINGET
                b'h' | b'j' => {
                    let index = if op == b'h' {
                        u32::from(self.u8("the BINGET index")?)
                    } else {
                        self.u32("the LONG_BINGET index")?
                    };
                    let value = self.memo.get(&index).cloned().ok_or_else(|| {
                        self.malformed(format!("memo entry {index} was never stored"))
                    })?;
                    self.stack.push(value);
                }
                // GLOBAL
                b'c' => {
                    let module = self.line("the GLOBAL module")?;
                    let name = self.line("the GLOBAL name")?;
                    self.stack
                        .push(Value::Global(Rc::from(module), Rc::from(name)));
                }
                // STACK_GLOBAL
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        (m, n) => {
                            return Err(self.malformed(format!(
                                "STACK_GLOBAL expects two str, found {} and {}",
                                m.describe(),
                                n.describe()
                            )));
                        }
                    }
                }
                // REDUCE
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = self.reduce(callable, args)?;
                    self.stack.push(value);
                }
                // NEWOBJ: cls.__new__(cls, *args), kept opaque
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.push_obj(Obj::Call(cls));
                    self.stack.push(v);
                }
                // BUILD: the state (e.g. a state dict's `_metadata`) is not needed
                b'b' => {
                    self.pop()?;
                    self.top()?;
                }
                // BINPERSID
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(&pid)?;
                    self.stack.push(storage);
                }
                other => {
                    return Err(CheckpointError::UnknownOpcode {
                        origin: self.origin.to_string(),
                        opcode: other,
                        printable: if other.is_ascii_graphic() {
                            char::from(other)
                        } else {
                            '?'
                        },
                        offset: self.op_offset,
                    });
                }
            }
        }
    }
}

/// A two's complement little-endian integer (`LONG1`/`LONG4`).
fn long_from_le(digits: &[u8]) -> Value {
    if digits.is_empty() {
        return Value::Int(0);
    }
    let negative = digits.last().is_some_and(|b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0x00 };
    // Bytes beyond 16 must be pure sign extension for the value to fit in i128.
    let (low, high) = digits.split_at(digits.len().min(16));
    let low_negative = low.last().is_some_and(|b| b & 0x80 != 0);
    if high.iter().any(|&b| b != fill) || (!high.is_empty() && low_negative != negative) {
        return Value::BigInt(digits.len());
    }
    let mut buf = [fill; 16];
    buf[..low.len()].copy_from_slice(low);
    Value::Int(i128::from_le_bytes(buf))
}

/// Dict key equality for the key types a state dict uses; other keys never compare equal (which
/// only means a duplicated exotic key is kept twice).
fn keys_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(a), Value::Str(b)) => a == b,
        (Value::Int(a), Value::Int(b)) => a == b,
        (Value::Bool(a), Value::Bool(b)) => a == b,
        (Value::None, Value::None) => true,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The checkpoint layout

struct Reader<'a> {
    bytes: &'a [u8],
    origin: &'a str,
}

impl Reader<'_> {
    fn layout(&self, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Layout {
            origin: self.origin.to_string(),
            message: message.into(),
        }
    }

    fn not_state_dict(&self, message: impl Into<String>) -> CheckpointError {
        CheckpointError::NotAStateDict {
            origin: self.origin.to_string(),
            message: message.into(),
        }
    }

    fn state_dict(&self) -> Result<BTreeMap<String, CheckpointTensor>, CheckpointError> {
        if self.bytes.starts_with(b"PK\x03\x04") {
            return Err(CheckpointError::ZipFormat {
                origin: self.origin.to_string(),
            });
        }
        if self.bytes.first() != Some(&0x80) {
            return Err(CheckpointError::BadMagic {
                origin: self.origin.to_string(),
                found: match self.bytes.first() {
                    Some(b) => {
                        format!("a file starting with byte 0x{b:02x}, not a pickle PROTO opcode")
                    }
                    None => "an empty file".into(),
                },
            });
        }

        // 1. Magic number.
        let mut magic = Machine::new(self.bytes, self.origin, 0);
        match magic.run()? {
            Value::Int(MAGIC) => {}
            other => {
                return Err(CheckpointError::BadMagic {
                    origin: self.origin.to_string(),
                    found: other.describe(),
                });
            }
        }

        // 2. Protocol version.
        let mut version = Machine::new(self.bytes, self.origin, magic.pos);
        match version.run()? {
            Value::Int(PROTOCOL_VERSION) => {}
            other => {
                return Err(CheckpointError::ProtocolVersion {
                    origin: self.origin.to_string(),
                    found: other.describe(),
                });
            }
        }

        // 3. sys_info.
        let mut sys_info = Machine::new(self.bytes, self.origin, version.pos);
        let info = sys_info.run()?;
        if let Some(Obj::Dict(entries)) = sys_info.obj(&info) {
            let little_endian = entries
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if &**s == "little_endian"));
            if let Some((_, Value::Bool(false))) = little_endian {
                return Err(self.layout(
                    "the checkpoint was saved on a big-endian machine, which is not supported",
                ));
            }
        } else {
            return Err(self.layout(format!(
                "expected the sys_info dict after the protocol version, found {}",
                describe_in(&sys_info, &info)
            )));
        }

        // 4. The object.
        let mut object = Machine::new(self.bytes, self.origin, sys_info.pos);
        let root = object.run()?;
        let entries = self.find_state_dict(&object, &root)?;

        // 5. Storage keys, in file order.
        let mut keys_machine = Machine::new(self.bytes, self.origin, object.pos);
        let keys_value = keys_machine.run()?;
        let keys: Vec<Rc<str>> = match keys_machine.obj(&keys_value) {
            Some(Obj::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => Ok(s.clone()),
                    other => Err(self.layout(format!(
                        "expected str storage keys, found {}",
                        other.describe()
                    ))),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(self.layout(format!(
                    "expected the list of storage keys after the object, found {}",
                    describe_in(&keys_machine, &keys_value)
                )));
            }
        };

        // Storage data: key -> byte range of its elements.
        let mut data: HashMap<Rc<str>, &[u8]> = HashMap::with_capacity(keys.len());
        let mut pos = keys_machine.pos;
        for key in &keys {
            let Some(&(dtype, numel)) = object.storages.get(key) else {
                return Err(self.layout(format!(
                    "storage '{key}' is listed at offset {pos} but no tensor names it, so its element size is unknown"
                )));
            };
            let header = self.bytes.get(pos..pos.saturating_add(8)).ok_or_else(|| {
                CheckpointError::Truncated {
                    origin: self.origin.to_string(),
                    what: format!("the element count of storage '{key}'"),
                    offset: pos,
                    needed: 8,
                    available: self.bytes.len().saturating_sub(pos),
                }
            })?;
            let mut count = [0u8; 8];
            count.copy_from_slice(header);
            let count = u64::from_le_bytes(count);
            if usize::try_from(count).ok() != Some(numel) {
                return Err(self.layout(format!(
                    "storage '{key}' at offset {pos} holds {count} elements, but the pickle says {numel}"
                )));
            }
            pos += 8;
            let available = self.bytes.len().saturating_sub(pos);
            let needed = numel
                .checked_mul(dtype.size())
                .filter(|&n| n <= available)
                .ok_or_else(|| CheckpointError::Truncated {
                    origin: self.origin.to_string(),
                    what: format!("the {numel} {dtype:?} elements of storage '{key}'"),
                    offset: pos,
                    needed: (numel as u64).saturating_mul(dtype.size() as u64),
                    available,
                })?;
            if data
                .insert(key.clone(), &self.bytes[pos..pos + needed])
                .is_some()
            {
                return Err(self.layout(format!("storage '{key}' is listed twice")));
            }
            pos += needed;
        }

        // Tensors sharing a storage are each copied out; bound the total so that many views of
        // one storage cannot make the output explode.
        let storage_elements: usize = keys
            .iter()
            .filter_map(|k| object.storages.get(k))
            .fold(0usize, |acc, &(_, n)| acc.saturating_add(n));
        let budget = storage_elements
            .saturating_mul(OUTPUT_BUDGET_FACTOR)
            .saturating_add(1024);
        let mut produced = 0usize;
        let mut out = BTreeMap::new();
        for (key, index) in entries {
            let spec = object
                .tensors
                .get(index)
                .ok_or_else(|| self.layout("internal: dangling tensor"))?;
            let tensor = self.tensor(&key, spec, &data)?;
            produced = produced.saturating_add(tensor.data.len());
            if produced > budget {
                return Err(self.layout(format!(
                    "the tensors hold more than {OUTPUT_BUDGET_FACTOR} times the {storage_elements} elements of the storages (many views of the same storage)"
                )));
            }
            out.insert(key, tensor);
        }
        Ok(out)
    }

    /// The (parameter name, tensor index) entries of the state dict in `root`.
    fn find_state_dict(
        &self,
        machine: &Machine<'_>,
        root: &Value,
    ) -> Result<Vec<(String, usize)>, CheckpointError> {
        let mut current = root.clone();
        let mut path = String::new();
        for _ in 0..=MAX_WRAPPING {
            let Some(Obj::Dict(entries)) = machine.obj(&current) else {
                return Err(self.not_state_dict(format!(
                    "expected a dict{}, found {}",
                    where_(&path),
                    describe_in(machine, &current)
                )));
            };
            let holds_tensors = entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
            if holds_tensors || entries.is_empty() {
                return entries
                    .iter()
                    .map(|(k, v)| match (k, v) {
                        (Value::Str(k), Value::Tensor(i)) => Ok((k.to_string(), *i)),
                        (Value::Str(k), other) => Err(self.not_state_dict(format!(
                            "entry '{k}'{} is {}, not a tensor",
                            where_(&path),
                            describe_in(machine, other)
                        ))),
                        (other, _) => Err(self.not_state_dict(format!(
                            "a key{} is {}, not a str",
                            where_(&path),
                            other.describe()
                        ))),
                    })
                    .collect();
            }
            let wrapped = WRAPPER_KEYS.iter().find_map(|name| {
                entries
                    .iter()
                    .find(|(k, v)| {
                        matches!(k, Value::Str(s) if &**s == *name)
                            && matches!(machine.obj(v), Some(Obj::Dict(_)))
                    })
                    .map(|(_, v)| (*name, v.clone()))
            });
            let Some((name, inner)) = wrapped else {
                let keys: Vec<String> = entries
                    .iter()
                    .take(10)
                    .map(|(k, _)| match k {
                        Value::Str(s) => format!("'{}'", truncate(s)),
                        other => other.describe(),
                    })
                    .collect();
                return Err(self.not_state_dict(format!(
                    "the dict{} holds no tensors and none of {WRAPPER_KEYS:?} with a dict (its keys: {})",
                    where_(&path),
                    keys.join(", ")
                )));
            };
            path.push_str(&format!("['{name}']"));
            current = inner;
        }
        Err(self.not_state_dict(format!(
            "no tensors found after {MAX_WRAPPING} levels of wrapping ({path})"
        )))
    }

    /// Gathers one tensor into row-major `f32`.
    fn tensor(
        &self,
        key: &str,
        spec: &TensorSpec,
        data: &HashMap<Rc<str>, &[u8]>,
    ) -> Result<CheckpointTensor, CheckpointError> {
        let err = |message: String| CheckpointError::Tensor {
            origin: self.origin.to_string(),
            key: key.to_string(),
            message,
        };
        let storage = &spec.storage;
        let bytes = data.get(&storage.key).ok_or_else(|| {
            err(format!(
                "its storage '{}' is not in the file's storage list",
                storage.key
            ))
        })?;
        let dtype = storage.dtype;
        if matches!(dtype, Dtype::Complex64 | Dtype::Complex128) {
            return Err(err(format!(
                "complex tensors ({dtype:?}) are not supported"
            )));
        }
        let numel = spec
            .size
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| err(format!("size {:?} overflows", spec.size)))?;
        if numel > storage.len {
            return Err(err(format!(
                "size {:?} has {numel} elements but storage '{}' only {} (overlapping strides are not supported)",
                spec.size, storage.key, storage.len
            )));
        }
        if numel > 0 {
            // Highest element index the tensor touches, within the (view) storage.
            let last = spec
                .size
                .iter()
                .zip(&spec.stride)
                .try_fold(spec.offset, |acc, (&size, &stride)| {
                    (size - 1)
                        .checked_mul(stride)
                        .and_then(|step| acc.checked_add(step))
                })
                .ok_or_else(|| {
                    err(format!(
                        "size {:?} with stride {:?} overflows",
                        spec.size, spec.stride
                    ))
                })?;
            if last >= storage.len {
                return Err(err(format!(
                    "storage offset {} with size {:?} and stride {:?} reaches element {last}, but storage '{}' has {} elements",
                    spec.offset, spec.size, spec.stride, storage.key, storage.len
                )));
            }
        }
        let base = storage
            .offset
            .checked_add(spec.offset)
            .ok_or_else(|| err("storage offset overflows".into()))?;
        let out = match dtype {
            Dtype::F32 => gather::<4>(bytes, base, spec, numel, f32::from_le_bytes),
            Dtype::F64 => gather::<8>(bytes, base, spec, numel, |b| f64::from_le_bytes(b) as f32),
            Dtype::F16 => gather::<2>(bytes, base, spec, numel, |b| {
                f16_to_f32(u16::from_le_bytes(b))
            }),
            Dtype::Bf16 => gather::<2>(bytes, base, spec, numel, |b| {
                f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
            }),
            Dtype::I64 => gather::<8>(bytes, base, spec, numel, |b| i64::from_le_bytes(b) as f32),
            Dtype::I32 => gather::<4>(bytes, base, spec, numel, |b| i32::from_le_bytes(b) as f32),
            Dtype::I16 => gather::<2>(bytes, base, spec, numel, |b| {
                f32::from(i16::from_le_bytes(b))
            }),
            Dtype::I8 => gather::<1>(bytes, base, spec, numel, |b| {
                f32::from(i8::from_le_bytes(b))
            }),
            Dtype::U8 => gather::<1>(bytes, base, spec, numel, |b| f32::from(b[0])),
            Dtype::Bool => gather::<1>(
                bytes,
                base,
                spec,
                numel,
                |b| if b[0] != 0 { 1.0 } else { 0.0 },
            ),
            Dtype::Complex64 | Dtype::Complex128 => None,
        };
        let data =
            out.ok_or_else(|| err(format!("elements lie outside storage '{}'", storage.key)))?;
        Ok(CheckpointTensor {
            shape: spec.size.clone(),
            data,
        })
    }
}

/// Reads `numel` elements of `N` bytes at element index `base` with the spec's size and stride,
/// in row-major order. `None` if an element lies outside `bytes` (the caller has checked bounds,
/// so this is only a safety net).
fn gather<const N: usize>(
    bytes: &[u8],
    base: usize,
    spec: &TensorSpec,
    numel: usize,
    convert: impl Fn([u8; N]) -> f32,
) -> Option<Vec<f32>> {
    let read = |index: usize| -> Option<f32> {
        let start = index.checked_mul(N)?;
        let chunk = bytes.get(start..start.checked_add(N)?)?;
        let mut buf = [0u8; N];
        buf.copy_from_slice(chunk);
        Some(convert(buf))
    };
    if numel == 0 {
        return Some(Vec::new());
    }
    let rank = spec.size.len();
    let mut contiguous = true;
    let mut expected = 1usize;
    for d in (0..rank).rev() {
        if spec.size[d] != 1 && spec.stride[d] != expected {
            contiguous = false;
        }
        expected = expected.checked_mul(spec.size[d])?;
    }
    if contiguous {
        let start = base.checked_mul(N)?;
        let chunk = bytes.get(start..start.checked_add(numel.checked_mul(N)?)?)?;
        return Some(
            chunk
                .chunks_exact(N)
                .map(|c| {
                    let mut buf = [0u8; N];
                    buf.copy_from_slice(c);
                    convert(buf)
                })
                .collect(),
        );
    }
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; rank];
    let mut position = base;
    for _ in 0..numel {
        out.push(read(position)?);
        // Odometer step over the row-major index.
        for d in (0..rank).rev() {
            index[d] += 1;
            position = position.checked_add(spec.stride[d])?;
            if index[d] < spec.size[d] {
                break;
            }
            position = position.checked_sub(spec.stride[d].checked_mul(spec.size[d])?)?;
            index[d] = 0;
        }
    }
    Some(out)
}

/// IEEE 754 half to single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exponent = u32::from((h >> 10) & 0x1f);
    let mantissa = u32::from(h & 0x3ff);
    let bits = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn where_(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at {path}")
    }
}

fn describe_in(machine: &Machine<'_>, value: &Value) -> String {
    match machine.obj(value) {
        Some(obj) => format!("a {}", obj.kind()),
        None => value.describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Emits protocol-2 pickle opcodes.
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn new() -> Self {
            Pickle(vec![0x80, 2])
        }
        fn op(&mut self, byte: u8) -> &mut Self {
            self.0.push(byte);
            self
        }
        fn int(&mut self, v: i64) -> &mut Self {
            if let Ok(b) = u8::try_from(v) {
                self.0.extend([b'K', b]);
            } else if let Ok(b) = u16::try_from(v) {
                self.0.push(b'M');
                self.0.extend(b.to_le_bytes());
            } else if let Ok(b) = i32::try_from(v) {
                self.0.push(b'J');
                self.0.extend(b.to_le_bytes());
            } else {
                self.long(v.into());
            }
            self
        }
        fn long(&mut self, v: i128) -> &mut Self {
            let bytes = v.to_le_bytes();
            // Shortest two's complement form.
            let mut n = 16;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80 != 0;
                if (top == 0 && !next_sign) || (top == 0xff && next_sign) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.0.extend([0x8a, n as u8]);
            self.0.extend(&bytes[..n]);
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend((s.len() as u32).to_le_bytes());
            self.0.extend(s.as_bytes());
            self
        }
        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.0.push(b'c');
            self.0.extend(format!("{module}\n{name}\n").as_bytes());
            self
        }
        fn put(&mut self, i: u8) -> &mut Self {
            self.0.extend([b'q', i]);
            self
        }
        fn get(&mut self, i: u8) -> &mut Self {
            self.0.extend([b'h', i]);
            self
        }
        fn mark(&mut self) -> &mut Self {
            self.op(b'(')
        }
        fn tuple(&mut self) -> &mut Self {
            self.op(b't')
        }
        fn ordered_dict(&mut self) -> &mut Self {
            self.global("collections", "OrderedDict").op(b')').op(b'R')
        }
        /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, as torch
        /// emits it.
        fn tensor(
            &mut self,
            storage: &str,
            key: &str,
            numel: i64,
            offset: i64,
            size: &[i64],
            stride: &[i64],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").mark();
            self.mark()
                .str("storage")
                .global("torch", storage)
                .str(key)
                .str("cpu")
                .int(numel)
                .op(b'N')
                .tuple();
            self.op(b'Q').int(offset);
            self.mark();
            for &s in size {
                self.int(s);
            }
            self.tuple().mark();
            for &s in stride {
                self.int(s);
            }
            self.tuple().op(0x89).ordered_dict().tuple().op(b'R')
        }
        fn finish(&mut self) -> Vec<u8> {
            self.op(b'.');
            std::mem::take(&mut self.0)
        }
    }

    /// A whole legacy checkpoint: header pickles, `object`, then the storages in order.
    fn checkpoint(object: Vec<u8>, storages: &[(&str, u64, Vec<u8>)]) -> Vec<u8> {
        let mut out = Pickle::new().long(MAGIC).finish();
        out.extend(Pickle::new().int(1001).finish());
        out.extend(
            Pickle::new()
                .op(b'}')
                .put(0)
                .mark()
                .str("protocol_version")
                .int(1001)
                .str("little_endian")
                .op(0x88)
                .str("type_sizes")
                .op(b'}')
                .mark()
                .str("short")
                .int(2)
                .str("int")
                .int(4)
                .str("long")
                .int(4)
                .op(b'u')
                .op(b'u')
                .finish(),
        );
        out.extend(object);
        let mut keys = Pickle::new();
        keys.op(b']').put(0).mark();
        for (key, _, _) in storages {
            keys.str(key);
        }
        out.extend(keys.op(b'e').finish());
        for (_, count, data) in storages {
            out.extend(count.to_le_bytes());
            out.extend(data);
        }
        out
    }

    fn f32s(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
        values.into_iter().flat_map(f32::to_le_bytes).collect()
    }

    /// `{conv.weight: 2x3x1x2 = 0..12, conv.bias: [0.5, -1.5]}` with a `_metadata` BUILD.
    fn two_tensors() -> Vec<u8> {
        let mut p = Pickle::new();
        p.ordered_dict().put(1).mark();
        p.str("conv.weight")
            .tensor("FloatStorage", "100", 12, 0, &[2, 3, 1, 2], &[6, 2, 2, 1]);
        p.str("conv.bias")
            .tensor("FloatStorage", "200", 2, 0, &[2], &[1]);
        p.op(b'u');
        // BUILD with {'_metadata': OrderedDict({'': {'version': 1}})}, as torch writes it.
        p.op(b'}')
            .mark()
            .str("_metadata")
            .ordered_dict()
            .mark()
            .str("")
            .op(b'}')
            .str("version")
            .int(1)
            .op(b's');
        p.op(b'u').op(b'u').op(b'b');
        checkpoint(
            p.finish(),
            &[
                ("100", 12, f32s((0..12).map(|i| i as f32))),
                ("200", 2, f32s([0.5, -1.5])),
            ],
        )
    }

    #[test]
    fn reads_two_float_tensors() {
        let tensors = parse_state_dict(&two_tensors(), "two.pth").unwrap();
        assert_eq!(tensors.len(), 2);
        let w = &tensors["conv.weight"];
        assert_eq!(w.shape, [2, 3, 1, 2]);
        assert_eq!(w.data, (0..12).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(
            tensors["conv.bias"],
            CheckpointTensor {
                shape: vec![2],
                data: vec![0.5, -1.5]
            }
        );
    }

    #[test]
    fn shared_storage_with_offset_and_memo() {
        let mut p = Pickle::new();
        p.ordered_dict().put(1).mark();
        p.str("a").tensor("FloatStorage", "7", 10, 0, &[4], &[1]);
        // Second tensor: same storage, from element 4, 2x3.
        p.str("b")
            .tensor("FloatStorage", "7", 10, 4, &[2, 3], &[3, 1]);
        p.op(b'u');
        let bytes = checkpoint(
            p.finish(),
            &[("7", 10, f32s((0..10).map(|i| i as f32 * 10.0)))],
        );
        let t = parse_state_dict(&bytes, "shared.pth").unwrap();
        assert_eq!(t["a"].data, [0.0, 10.0, 20.0, 30.0]);
        assert_eq!(t["b"].shape, [2, 3]);
        assert_eq!(t["b"].data, [40.0, 50.0, 60.0, 70.0, 80.0, 90.0]);

        // Memoised globals and storage tuples (BINPUT/BINGET), as torch emits the second time.
        let mut p = Pickle::new();
        p.ordered_dict().put(1).mark();
        p.str("x")
            .global("torch._utils", "_rebuild_tensor_v2")
            .put(2)
            .mark();
        p.mark()
            .str("storage")
            .global("torch", "FloatStorage")
            .str("k")
            .str("cpu")
            .int(3)
            .op(b'N')
            .tuple()
            .put(3);
        p.op(b'Q')
            .int(0)
            .int(3)
            .op(0x85)
            .int(1)
            .op(0x85)
            .op(0x89)
            .ordered_dict()
            .tuple()
            .op(b'R');
        p.str("y")
            .get(2)
            .mark()
            .get(3)
            .op(b'Q')
            .int(2)
            .op(b')')
            .op(b')')
            .op(0x89)
            .op(b'N')
            .tuple()
            .op(b'R');
        p.op(b'u');
        let bytes = checkpoint(p.finish(), &[("k", 3, f32s([1.0, 2.0, 3.0]))]);
        let t = parse_state_dict(&bytes, "memo.pth").unwrap();
        assert_eq!(t["x"].data, [1.0, 2.0, 3.0]);
        assert_eq!(
            t["y"],
            CheckpointTensor {
                shape: vec![],
                data: vec![3.0]
            }
        );
    }

    #[test]
    fn strided_tensor_is_gathered_row_major() {
        // A 2x3 tensor stored transposed (stride (1, 2)), like EfficientNet-Lite0's weights.
        let mut p = Pickle::new();
        p.ordered_dict().mark();
        p.str("fc.weight")
            .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[1, 2]);
        p.op(b'u');
        let bytes = checkpoint(
            p.finish(),
            &[("0", 6, f32s([0.0, 3.0, 1.0, 4.0, 2.0, 5.0]))],
        );
        let t = parse_state_dict(&bytes, "t.pth").unwrap();
        assert_eq!(t["fc.weight"].data, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);

        // Strides that run past the storage name the tensor.
        let mut p = Pickle::new();
        p.ordered_dict().mark();
        p.str("bad.weight")
            .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 2]);
        p.op(b'u');
        let bytes = checkpoint(p.finish(), &[("0", 6, f32s([0.0; 6]))]);
        let err = parse_state_dict(&bytes, "t.pth").unwrap_err();
        assert!(
            matches!(&err, CheckpointError::Tensor { key, .. } if key == "bad.weight"),
            "{err}"
        );
    }

    #[test]
    fn long_double_half_storages_become_f32() {
        let mut p = Pickle::new();
        p.ordered_dict().mark();
        p.str("bn.num_batches_tracked")
            .tensor("LongStorage", "n", 1, 0, &[], &[]);
        p.str("d").tensor("DoubleStorage", "d", 2, 0, &[2], &[1]);
        p.str("h").tensor("HalfStorage", "h", 4, 0, &[4], &[1]);
        p.op(b'u');
        let bytes = checkpoint(
            p.finish(),
            &[
                ("n", 1, 1_431_430i64.to_le_bytes().to_vec()),
                (
                    "d",
                    2,
                    [0.25f64, -3.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                (
                    "h",
                    4,
                    [0x3c00u16, 0xc000, 0x3800, 0x0001]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
            ],
        );
        let t = parse_state_dict(&bytes, "types.pth").unwrap();
        assert_eq!(
            t["bn.num_batches_tracked"],
            CheckpointTensor {
                shape: vec![],
                data: vec![1_431_430.0]
            }
        );
        assert_eq!(t["d"].data, [0.25, -3.0]);
        assert_eq!(t["h"].data, [1.0, -2.0, 0.5, 2f32.powi(-24)]);
    }

    #[test]
    fn wrapped_state_dict() {
        let mut p = Pickle::new();
        p.op(b'}')
            .mark()
            .str("epoch")
            .int(3)
            .str("state_dict")
            .ordered_dict()
            .mark();
        p.str("w").tensor("FloatStorage", "0", 1, 0, &[1], &[1]);
        p.op(b'u').op(b'u');
        let bytes = checkpoint(p.finish(), &[("0", 1, f32s([4.0]))]);
        let t = parse_state_dict(&bytes, "wrapped.pth").unwrap();
        assert_eq!(t["w"].data, [4.0]);

        // A dict with neither tensors nor a wrapper key.
        let mut p = Pickle::new();
        p.op(b'}').mark().str("epoch").int(3).op(b'u');
        let err = parse_state_dict(&checkpoint(p.finish(), &[]), "x.pth").unwrap_err();
        assert!(
            matches!(err, CheckpointError::NotAStateDict { .. }),
            "{err}"
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = two_tensors();
        for cut in 0..bytes.len() {
            assert!(
                parse_state_dict(&bytes[..cut], "cut.pth").is_err(),
                "cut at {cut}"
            );
        }
        let err = parse_state_dict(&bytes[..bytes.len() - 1], "cut.pth").unwrap_err();
        assert!(matches!(err, CheckpointError::Truncated { .. }), "{err}");
    }

    #[test]
    fn flipped_bytes_never_panic() {
        let bytes = two_tensors();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80, 0xff, 0x10] {
                let mut corrupt = bytes.clone();
                corrupt[i] ^= flip;
                let _ = parse_state_dict(&corrupt, "flip.pth");
            }
        }
    }

    #[test]
    fn bad_magic_zip_and_protocol() {
        let mut bytes = Pickle::new().long(0x1234).finish();
        bytes.extend(&two_tensors()[15..]);
        let err = parse_state_dict(&bytes, "m.pth").unwrap_err();
        assert!(matches!(err, CheckpointError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("int 4660"), "{err}");

        let err = parse_state_dict(b"PK\x03\x04rest", "z.pth").unwrap_err();
        assert!(matches!(err, CheckpointError::ZipFormat { .. }), "{err}");
        let err = parse_state_dict(b"hello", "h.pth").unwrap_err();
        assert!(matches!(err, CheckpointError::BadMagic { .. }), "{err}");

        let mut bytes = Pickle::new().long(MAGIC).finish();
        bytes.extend(Pickle::new().int(1000).finish());
        let err = parse_state_dict(&bytes, "p.pth").unwrap_err();
        assert!(
            matches!(err, CheckpointError::ProtocolVersion { .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_opcode_names_byte_and_offset() {
        let mut bytes = Pickle::new().long(MAGIC).finish();
        let offset = bytes.len() + 2;
        bytes.extend([0x80, 2, b'I', b'1', b'\n', b'.']);
        let err = parse_state_dict(&bytes, "op.pth").unwrap_err();
        match err {
            CheckpointError::UnknownOpcode {
                opcode, offset: at, ..
            } => {
                assert_eq!((opcode, at), (b'I', offset));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn hostile_lengths_and_nesting() {
        // A string claiming 4 GiB: a truncation error, no allocation.
        let mut bytes = Pickle::new().long(MAGIC).finish();
        bytes.extend([0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a']);
        let err = parse_state_dict(&bytes, "s.pth").unwrap_err();
        assert!(
            matches!(
                err,
                CheckpointError::Truncated {
                    needed: 0xffff_ffff,
                    ..
                }
            ),
            "{err}"
        );

        // 200 000 nested tuples: no recursion, so no stack overflow.
        let mut bytes = Pickle::new().long(MAGIC).finish();
        bytes.extend([0x80, 2, b'N']);
        bytes.extend(std::iter::repeat_n(0x85, 200_000));
        bytes.push(b'.');
        let err = parse_state_dict(&bytes, "n.pth").unwrap_err();
        assert!(
            matches!(err, CheckpointError::ProtocolVersion { .. }),
            "{err}"
        );

        // A storage claiming more elements than the file holds.
        let mut p = Pickle::new();
        p.ordered_dict().mark();
        p.str("w")
            .tensor("FloatStorage", "0", 1 << 40, 0, &[1], &[1]);
        p.op(b'u');
        let bytes = checkpoint(p.finish(), &[("0", 1 << 40, f32s([1.0]))]);
        let err = parse_state_dict(&bytes, "big.pth").unwrap_err();
        assert!(matches!(err, CheckpointError::Truncated { .. }), "{err}");
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = read_state_dict(Path::new("/nonexistent/x.pth")).unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/x.pth"));
    }
}
