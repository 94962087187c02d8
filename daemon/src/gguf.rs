//! GGUF (versions 2 and 3) header parsing: metadata key/values and the tensor table.
//!
//! Only the header is read; tensor data stays on disk for MLX's own loader (`mlx_load_gguf`).
//! Every count and length in a GGUF is attacker-controlled, so each one is checked against the
//! bytes left in the file and against fixed sanity limits before anything is allocated: a
//! corrupt or hostile file gives a [`GgufError`] naming the file, the key or tensor and the
//! byte offset, never a panic or a huge allocation. [`parse`] takes bytes, for fuzzing.
//!
//! Layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 key/value count,
//! the key/values (u64-length-prefixed key, u32 value type, value), the tensor infos (name,
//! u32 dimension count, u64 dimensions with the fastest-varying first, u32 ggml type, u64
//! offset into the data section), padding to `general.alignment`, then tensor data.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;
/// Header bytes (metadata plus tensor table) beyond which a file is refused. Real headers are a
/// few MiB (the vocabulary dominates); this bounds what a hostile header can make us read.
pub const MAX_HEADER_BYTES: u64 = 128 << 20;
const MAX_KEY_LEN: u64 = 1 << 16;
const MAX_TENSOR_NAME_LEN: u64 = 1 << 10;
const MAX_STRING_LEN: u64 = 1 << 26;
const MAX_ARRAY_LEN: u64 = 1 << 26;
const MAX_ARRAY_DEPTH: usize = 4;

/// The tensor types mlxd lets through to MLX 0.32's `mlx_load_gguf`. What MLX makes of them
/// (pinned by tests/gguf_tokenizer.rs): F32 and F16 stay as they are; BF16 becomes float16;
/// Q4_0, Q4_1 and Q8_0 become MLX-quantized `weight`/`scales`/`biases` with groups of 32;
/// Q4_K is dequantized to dense float16. MLX would dequantize Q2_K and Q6_K the same way, but
/// they are refused here; it fails on the other types, and silently drops tensors whose type id
/// is 31 or more, which is why files are checked before MLX sees them.
pub const MLX_LOADABLE: [GgmlType; 7] =
    [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4_K, GgmlType::Q8_0];

/// Everything that can go wrong reading a GGUF header or looking up its metadata.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening or reading the file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{}: not a GGUF file (starts with {found:?}, expected \"GGUF\")", .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first four bytes.
        found: [u8; 4],
    },
    /// A version other than 2 or 3.
    #[error("{}: GGUF version {version} is not supported (only 2 and 3){hint}", .path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version as read, little-endian.
        version: u32,
        /// Extra explanation, such as a big-endian file.
        hint: &'static str,
    },
    /// The file ends before a fixed-size field does.
    #[error("{}: truncated at byte {offset} while reading {context}", .path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the missing bytes should have started.
        offset: u64,
        /// What was being read.
        context: String,
    },
    /// A field is present but its value is impossible or beyond a limit.
    #[error("{}: at byte {offset}, {context}: {problem}", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Where the field starts.
        offset: u64,
        /// What was being read.
        context: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A tensor's data lies outside the file or is misaligned.
    #[error("{}: tensor `{tensor}` {problem}", .path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A required metadata key is absent.
    #[error("{}: metadata key `{key}` is missing", .path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value has another type than the caller needs.
    #[error("{}: metadata key `{key}` has type {actual}, expected {expected}", .path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file holds.
        actual: String,
    },
    /// A numeric metadata value does not fit the type the caller needs.
    #[error("{}: metadata key `{key}` holds {value}, which does not fit in {expected}", .path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// The value, printed.
        value: String,
        /// What the caller asked for.
        expected: &'static str,
    },
    /// A tensor type MLX's GGUF loader cannot turn into a usable array.
    #[error(
        "{}tensor `{tensor}` has type {ggml_type}, which MLX cannot load (supported: {})",
        .path.as_ref().map_or_else(String::new, |p| format!("{}: ", p.display())),
        loadable_names()
    )]
    Unloadable {
        /// The file, when known.
        path: Option<PathBuf>,
        /// The first such tensor.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
    },
}

fn loadable_names() -> String {
    MLX_LOADABLE.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
}

macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $block:literal, $size:literal;)*) => {
        /// A ggml tensor element type, as stored in a GGUF tensor info.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum GgmlType {
            $(
                #[doc = concat!("`", stringify!($variant), "` (ggml type id ", $id, ")")]
                $variant = $id,
            )*
        }

        impl GgmlType {
            /// The type with this ggml id; `None` for ids ggml never used or has removed.
            pub fn from_id(id: u32) -> Option<Self> {
                match id {
                    $($id => Some(Self::$variant),)*
                    _ => None,
                }
            }

            /// ggml's name for the type (`Q4_K`, `BF16`).
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => stringify!($variant),)*
                }
            }

            /// Elements per block (1 for plain types, 32 or 256 for quantized ones).
            pub fn block_size(self) -> u64 {
                match self {
                    $(Self::$variant => $block,)*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self {
                    $(Self::$variant => $size,)*
                }
            }
        }
    };
}

// Ids and block layouts from ggml (`ggml.h`, the `block_*` structs of `ggml-common.h`).
ggml_types! {
    F32 = 0, 1, 4;
    F16 = 1, 1, 2;
    Q4_0 = 2, 32, 18;
    Q4_1 = 3, 32, 20;
    Q5_0 = 6, 32, 22;
    Q5_1 = 7, 32, 24;
    Q8_0 = 8, 32, 34;
    Q8_1 = 9, 32, 36;
    Q2_K = 10, 256, 84;
    Q3_K = 11, 256, 110;
    Q4_K = 12, 256, 144;
    Q5_K = 13, 256, 176;
    Q6_K = 14, 256, 210;
    Q8_K = 15, 256, 292;
    IQ2_XXS = 16, 256, 66;
    IQ2_XS = 17, 256, 74;
    IQ3_XXS = 18, 256, 98;
    IQ1_S = 19, 256, 50;
    IQ4_NL = 20, 32, 18;
    IQ3_S = 21, 256, 110;
    IQ2_S = 22, 256, 82;
    IQ4_XS = 23, 256, 136;
    I8 = 24, 1, 1;
    I16 = 25, 1, 2;
    I32 = 26, 1, 4;
    I64 = 27, 1, 8;
    F64 = 28, 1, 8;
    IQ1_M = 29, 256, 56;
    BF16 = 30, 1, 2;
    TQ1_0 = 34, 256, 54;
    TQ2_0 = 35, 256, 66;
    MXFP4 = 39, 32, 17;
    NVFP4 = 40, 64, 36;
    Q1_0 = 41, 128, 18;
}

impl GgmlType {
    /// The ggml id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Whether MLX's GGUF loader handles this type (see [`MLX_LOADABLE`]).
    pub fn is_mlx_loadable(self) -> bool {
        MLX_LOADABLE.contains(&self)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

macro_rules! value_types {
    ($($variant:ident($t:ty) = $id:literal;)*) => {
        /// One metadata value. Strings with invalid UTF-8 have it replaced by U+FFFD.
        #[derive(Debug, Clone, PartialEq)]
        pub enum GgufValue {
            $(
                #[doc = concat!("GGUF value type ", $id, ".")]
                $variant($t),
            )*
            /// GGUF value type 7 (one byte, 0 or 1).
            Bool(bool),
            /// GGUF value type 8.
            String(String),
            /// GGUF value type 9.
            Array(GgufArray),
        }

        /// A metadata array: one element type for all, stored unboxed.
        #[derive(Debug, Clone, PartialEq)]
        pub enum GgufArray {
            $(
                #[doc = concat!("Elements of GGUF value type ", $id, ".")]
                $variant(Vec<$t>),
            )*
            /// Elements of GGUF value type 7.
            Bool(Vec<bool>),
            /// Elements of GGUF value type 8.
            String(Vec<String>),
            /// Arrays, each with its own element type.
            Array(Vec<GgufArray>),
        }

        impl GgufValue {
            /// The GGUF type name (`u32`, `string`, `array of string`).
            pub fn type_name(&self) -> String {
                match self {
                    $(Self::$variant(_) => TYPE_NAMES[$id].into(),)*
                    Self::Bool(_) => "bool".into(),
                    Self::String(_) => "string".into(),
                    Self::Array(a) => a.type_name(),
                }
            }
        }

        impl GgufArray {
            /// The number of elements.
            pub fn len(&self) -> usize {
                match self {
                    $(Self::$variant(v) => v.len(),)*
                    Self::Bool(v) => v.len(),
                    Self::String(v) => v.len(),
                    Self::Array(v) => v.len(),
                }
            }

            /// `array of <element type>`.
            pub fn type_name(&self) -> String {
                let element = match self {
                    $(Self::$variant(_) => TYPE_NAMES[$id],)*
                    Self::Bool(_) => "bool",
                    Self::String(_) => "string",
                    Self::Array(_) => "array",
                };
                format!("array of {element}")
            }
        }

        impl<R: Read> Parser<'_, R> {
            fn value(&mut self, t: u32, depth: usize) -> Result<GgufValue, GgufError> {
                Ok(match t {
                    $($id => GgufValue::$variant(<$t>::from_le_bytes(self.fixed()?)),)*
                    7 => GgufValue::Bool(self.bool()?),
                    8 => GgufValue::String(self.string()?),
                    _ => GgufValue::Array(self.array(depth)?),
                })
            }

            /// `n` elements of type `t`, whose size was checked against the file.
            fn elements(&mut self, t: u32, n: u64, depth: usize) -> Result<GgufArray, GgufError> {
                // Capacity grows with what is actually read, never with the declared count alone.
                let cap = (n as usize).min(1 << 16);
                macro_rules! collect {
                    ($read:expr) => {{
                        let mut v = Vec::with_capacity(cap);
                        for _ in 0..n {
                            v.push($read);
                        }
                        v
                    }};
                }
                Ok(match t {
                    $($id => GgufArray::$variant(collect!(<$t>::from_le_bytes(self.fixed()?))),)*
                    7 => GgufArray::Bool(collect!(self.bool()?)),
                    8 => GgufArray::String(collect!(self.string()?)),
                    _ => GgufArray::Array(collect!(self.array(depth + 1)?)),
                })
            }
        }
    };
}

value_types! {
    U8(u8) = 0;
    I8(i8) = 1;
    U16(u16) = 2;
    I16(i16) = 3;
    U32(u32) = 4;
    I32(i32) = 5;
    F32(f32) = 6;
    U64(u64) = 10;
    I64(i64) = 11;
    F64(f64) = 12;
}

const TYPE_NAMES: [&str; 13] =
    ["u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"];

/// Bytes of one element of value type `t`, or for strings and arrays the least they take.
fn min_value_size(t: u32) -> u64 {
    match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        _ => 12,
    }
}

impl GgufValue {
    /// The value if it is an integer of any width.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl GgufArray {
    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as integers if they are integers of any width.
    fn integers(&self) -> Option<Vec<i128>> {
        fn all<T: Copy + Into<i128>>(v: &[T]) -> Vec<i128> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            Self::U8(v) => all(v),
            Self::I8(v) => all(v),
            Self::U16(v) => all(v),
            Self::I16(v) => all(v),
            Self::U32(v) => all(v),
            Self::I32(v) => all(v),
            Self::U64(v) => all(v),
            Self::I64(v) => all(v),
            _ => return None,
        })
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: the fastest-varying (row length) first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in MLX/NumPy order (slowest-varying first): `dims` reversed.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }

    /// The number of elements.
    pub fn n_elements(&self) -> u64 {
        // Cannot overflow: parsing checked the product.
        self.dims.iter().product()
    }

    /// Refuses a type outside [`MLX_LOADABLE`], naming the tensor (but not the file: see
    /// [`GgufFile::check_loadable`]).
    pub fn check_loadable(&self) -> Result<(), GgufError> {
        if self.ggml_type.is_mlx_loadable() {
            Ok(())
        } else {
            Err(GgufError::Unloadable { path: None, tensor: self.name.clone(), ggml_type: self.ggml_type })
        }
    }

    /// Bytes of data in the file.
    pub fn n_bytes(&self) -> u64 {
        (self.n_elements() / self.ggml_type.block_size()).saturating_mul(self.ggml_type.type_size())
    }
}

/// A parsed GGUF header. Metadata is reached through the typed getters ([`Self::get_u32`],
/// [`Self::get_str_array`], ...), which name the key and the types in their errors.
#[derive(Clone)]
pub struct GgufFile {
    /// The file the header was read from (`<memory>` for [`parse`]).
    pub path: PathBuf,
    /// GGUF version, 2 or 3.
    pub version: u32,
    /// The tensor table in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data section alignment (`general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute file offset of the data section; a tensor's data starts at this plus its offset.
    pub data_offset: u64,
    /// Length of the whole file in bytes.
    pub file_len: u64,
    metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    // The vocabulary alone is tens of thousands of strings: print a summary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.file_len)
            .finish()
    }
}

/// Reads the header of the GGUF file at `path`: metadata and tensor table, not tensor data.
pub fn read_header(path: &Path) -> Result<GgufFile, GgufError> {
    let io = |source| GgufError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    read_from(BufReader::new(file), len, path)
}

/// Parses a whole GGUF file held in memory (errors call it `<memory>`).
pub fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    read_from(bytes, bytes.len() as u64, Path::new("<memory>"))
}

/// Parses a GGUF header from `reader`, positioned at the start of a file of `file_len` bytes;
/// `path` is only used in messages. Reads no further than the end of the tensor table.
pub fn read_from<R: Read>(reader: R, file_len: u64, path: &Path) -> Result<GgufFile, GgufError> {
    Parser { reader, pos: 0, file_len, path, context: String::new() }.file()
}

struct Parser<'p, R> {
    reader: R,
    pos: u64,
    file_len: u64,
    path: &'p Path,
    context: String,
}

impl<R: Read> Parser<'_, R> {
    fn truncated(&self) -> GgufError {
        GgufError::Truncated { path: self.path.into(), offset: self.pos, context: self.context.clone() }
    }

    fn malformed(&self, offset: u64, problem: String) -> GgufError {
        GgufError::Malformed { path: self.path.into(), offset, context: self.context.clone(), problem }
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut buf = [0; N];
        if self.pos + N as u64 > self.file_len {
            return Err(self.truncated());
        }
        self.reader.read_exact(&mut buf).map_err(|e| self.read_error(e))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn read_error(&self, e: std::io::Error) -> GgufError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.truncated()
        } else {
            GgufError::Io { path: self.path.into(), source: e }
        }
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        self.fixed().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        self.fixed().map(u64::from_le_bytes)
    }

    /// Checks that `count` items of at least `min_size` bytes each can still follow, and that
    /// `count` is within `limit`; `at` is where the count was read.
    fn check_count(&self, at: u64, what: &str, count: u64, min_size: u64, limit: u64) -> Result<(), GgufError> {
        if count > limit {
            return Err(self.malformed(at, format!("{what} {count} exceeds the limit of {limit}")));
        }
        let need = count.saturating_mul(min_size);
        let left = self.file_len.saturating_sub(self.pos);
        if need > left {
            return Err(self.malformed(at, format!("{what} {count} needs {need} bytes but only {left} are left")));
        }
        if self.pos.saturating_add(need) > MAX_HEADER_BYTES {
            return Err(
                self.malformed(at, format!("{what} {count} makes the header larger than {MAX_HEADER_BYTES} bytes"))
            );
        }
        Ok(())
    }

    fn bytes(&mut self, what: &str, limit: u64) -> Result<Vec<u8>, GgufError> {
        let at = self.pos;
        let len = self.u64()?;
        self.check_count(at, what, len, 1, limit)?;
        let mut buf = vec![0; len as usize];
        self.reader.read_exact(&mut buf).map_err(|e| self.read_error(e))?;
        self.pos += len;
        Ok(buf)
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let bytes = self.bytes("string length", MAX_STRING_LEN)?;
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    fn name(&mut self, what: &str, limit: u64) -> Result<String, GgufError> {
        let at = self.pos;
        let bytes = self.bytes(what, limit)?;
        String::from_utf8(bytes).map_err(|_| self.malformed(at, "not valid UTF-8".into()))
    }

    fn value_type(&mut self) -> Result<u32, GgufError> {
        let at = self.pos;
        let t = self.u32()?;
        if t as usize >= TYPE_NAMES.len() {
            return Err(self.malformed(at, format!("unknown value type {t}")));
        }
        Ok(t)
    }

    fn bool(&mut self) -> Result<bool, GgufError> {
        let at = self.pos;
        match self.fixed::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.malformed(at, format!("bool has value {b}, not 0 or 1"))),
        }
    }

    fn array(&mut self, depth: usize) -> Result<GgufArray, GgufError> {
        let at = self.pos;
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.malformed(at, format!("arrays nested deeper than {MAX_ARRAY_DEPTH}")));
        }
        let t = self.value_type()?;
        let count_at = self.pos;
        let n = self.u64()?;
        self.check_count(count_at, "array length", n, min_value_size(t), MAX_ARRAY_LEN)?;
        self.elements(t, n, depth)
    }

    fn tensor_info(&mut self, index: u64) -> Result<TensorInfo, GgufError> {
        self.context = format!("the name of tensor #{index}");
        let name = self.name("tensor name length", MAX_TENSOR_NAME_LEN)?;
        self.context = format!("tensor `{name}`");
        let at = self.pos;
        let n_dims = self.u32()?;
        if n_dims as usize > MAX_DIMS {
            return Err(self.malformed(at, format!("{n_dims} dimensions, more than ggml's {MAX_DIMS}")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut n_elements: u64 = 1;
        for _ in 0..n_dims {
            let at = self.pos;
            let d = self.u64()?;
            n_elements = n_elements.checked_mul(d).filter(|&n| n <= i64::MAX as u64).ok_or_else(|| {
                self.malformed(at, format!("dimensions {dims:?} then {d} overflow the element count"))
            })?;
            dims.push(d);
        }
        let at = self.pos;
        let id = self.u32()?;
        let ggml_type =
            GgmlType::from_id(id).ok_or_else(|| self.malformed(at, format!("unknown ggml type id {id}")))?;
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_type.block_size() != 0 {
            return Err(self.malformed(
                at,
                format!(
                    "type {ggml_type} needs rows that are a multiple of {}, but a row has {row} elements",
                    ggml_type.block_size()
                ),
            ));
        }
        if (n_elements / ggml_type.block_size()).checked_mul(ggml_type.type_size()).is_none() {
            return Err(
                self.malformed(at, format!("{n_elements} elements of type {ggml_type} overflow the byte count"))
            );
        }
        let offset = self.u64()?;
        Ok(TensorInfo { name, dims, ggml_type, offset })
    }

    fn file(mut self) -> Result<GgufFile, GgufError> {
        self.context = "the magic number".into();
        let magic = self.fixed::<4>()?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path: self.path.into(), found: magic });
        }
        self.context = "the version".into();
        let version = self.u32()?;
        if version != 2 && version != 3 {
            let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
                "; this looks like a big-endian file, which is not supported"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion { path: self.path.into(), version, hint });
        }
        self.context = "the tensor count".into();
        let tensors_at = self.pos;
        let n_tensors = self.u64()?;
        self.context = "the metadata count".into();
        let kv_at = self.pos;
        let n_kv = self.u64()?;
        // Smallest key/value: empty key (8) + type (4) + a one-byte value. Smallest tensor
        // info: empty name (8) + dimension count (4) + type (4) + offset (8).
        self.check_count(kv_at, "metadata count", n_kv, 13, u64::MAX)?;
        self.context = "the tensor count".into();
        self.check_count(tensors_at, "tensor count", n_tensors, 24, u64::MAX)?;

        let mut metadata = Vec::with_capacity((n_kv as usize).min(1 << 10));
        let mut index = HashMap::new();
        let mut alignment = DEFAULT_ALIGNMENT;
        for i in 0..n_kv {
            self.context = format!("metadata key #{i}");
            let at = self.pos;
            let key = self.name("key length", MAX_KEY_LEN)?;
            self.context = format!("metadata key `{key}`");
            if index.contains_key(&key) {
                return Err(self.malformed(at, "the key appears twice".into()));
            }
            let t = self.value_type()?;
            let value_at = self.pos;
            let value = self.value(t, 0)?;
            if key == "general.alignment" {
                alignment = match value {
                    GgufValue::U32(a) if a.is_power_of_two() => a.into(),
                    ref other => {
                        let problem =
                            format!("must be a power of two of type u32, found {} {other:?}", other.type_name());
                        return Err(self.malformed(value_at, problem));
                    }
                };
            }
            index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let mut tensors = Vec::with_capacity((n_tensors as usize).min(1 << 12));
        let mut names = HashMap::new();
        for i in 0..n_tensors {
            let at = self.pos;
            let t = self.tensor_info(i)?;
            if names.insert(t.name.clone(), i).is_some() {
                return Err(self.malformed(at, "a tensor of this name appears twice".into()));
            }
            tensors.push(t);
        }

        let data_offset = self.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            let bad =
                |problem: String| GgufError::BadTensor { path: self.path.into(), tensor: t.name.clone(), problem };
            if t.offset % alignment != 0 {
                return Err(bad(format!(
                    "has offset {} in the data section, not a multiple of the alignment {alignment}",
                    t.offset
                )));
            }
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes()));
            match end {
                Some(end) if end <= self.file_len => {}
                _ => {
                    return Err(bad(format!(
                        "needs bytes {}..{} of the file, which has {} (truncated download?)",
                        data_offset.saturating_add(t.offset),
                        end.map_or_else(|| "overflow".to_string(), |e| e.to_string()),
                        self.file_len
                    )))
                }
            }
        }

        Ok(GgufFile {
            path: self.path.into(),
            version,
            metadata,
            index,
            tensors,
            alignment,
            data_offset,
            file_len: self.file_len,
        })
    }
}

macro_rules! int_getters {
    ($($get:ident, $opt:ident, $t:ty, $name:literal;)*) => {$(
        #[doc = concat!("The value of `key` as ", $name, "; integers of any width are accepted if they fit.")]
        pub fn $get(&self, key: &str) -> Result<$t, GgufError> {
            self.$opt(key)?.ok_or_else(|| self.missing(key))
        }

        #[doc = concat!("Like [`Self::", stringify!($get), "`], but `None` when the key is absent.")]
        pub fn $opt(&self, key: &str) -> Result<Option<$t>, GgufError> {
            let Some(value) = self.get(key) else { return Ok(None) };
            let n = value.as_integer().ok_or_else(|| self.wrong_type(key, $name, value.type_name()))?;
            <$t>::try_from(n).map(Some).map_err(|_| GgufError::OutOfRange {
                path: self.path.clone(),
                key: key.into(),
                value: n.to_string(),
                expected: $name,
            })
        }
    )*};
}

macro_rules! int_array_getters {
    ($($get:ident, $t:ty, $name:literal;)*) => {$(
        #[doc = concat!("The array at `key` as ", $name, "; integer elements of any width are accepted if they fit.")]
        pub fn $get(&self, key: &str) -> Result<Vec<$t>, GgufError> {
            let array = self.array(key, concat!("an array of ", $name))?;
            let ints = array
                .integers()
                .ok_or_else(|| self.wrong_type(key, concat!("an array of ", $name), array.type_name()))?;
            ints.into_iter()
                .map(|n| {
                    <$t>::try_from(n).map_err(|_| GgufError::OutOfRange {
                        path: self.path.clone(),
                        key: key.into(),
                        value: format!("an element {n}"),
                        expected: $name,
                    })
                })
                .collect()
        }
    )*};
}

impl GgufFile {
    /// A header with the given metadata and no tensors, as if read from `path`: for tests and
    /// tools that build metadata in memory. Refuses duplicate keys.
    pub fn from_metadata(path: &Path, metadata: Vec<(String, GgufValue)>) -> Result<Self, GgufError> {
        let mut index = HashMap::new();
        for (i, (key, _)) in metadata.iter().enumerate() {
            if index.insert(key.clone(), i).is_some() {
                return Err(GgufError::Malformed {
                    path: path.into(),
                    offset: 0,
                    context: format!("metadata key `{key}`"),
                    problem: "the key appears twice".into(),
                });
            }
        }
        Ok(Self {
            path: path.into(),
            version: 3,
            tensors: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
            data_offset: 0,
            file_len: 0,
            metadata,
            index,
        })
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// `general.architecture` (`llama`, `qwen2`).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// Refuses the file if any tensor has a type outside [`MLX_LOADABLE`], naming the first one.
    pub fn check_loadable(&self) -> Result<(), GgufError> {
        match self.tensors.iter().find(|t| !t.ggml_type.is_mlx_loadable()) {
            Some(t) => Err(GgufError::Unloadable {
                path: Some(self.path.clone()),
                tensor: t.name.clone(),
                ggml_type: t.ggml_type,
            }),
            None => Ok(()),
        }
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey { path: self.path.clone(), key: key.into() }
    }

    fn wrong_type(&self, key: &str, expected: &'static str, actual: String) -> GgufError {
        GgufError::WrongType { path: self.path.clone(), key: key.into(), expected, actual }
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key).ok_or_else(|| self.missing(key))
    }

    int_getters! {
        get_u8, opt_u8, u8, "u8";
        get_u16, opt_u16, u16, "u16";
        get_u32, opt_u32, u32, "u32";
        get_u64, opt_u64, u64, "u64";
        get_i32, opt_i32, i32, "i32";
        get_i64, opt_i64, i64, "i64";
        get_usize, opt_usize, usize, "usize";
    }

    /// The value of `key` as f32; any float or integer is accepted.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    /// Like [`Self::get_f32`], but `None` when the key is absent.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        Ok(Some(match *value {
            GgufValue::F32(v) => v,
            GgufValue::F64(v) => v as f32,
            ref other => match other.as_integer() {
                Some(n) => n as f32,
                None => return Err(self.wrong_type(key, "a number", other.type_name())),
            },
        }))
    }

    /// The value of `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }

    /// Like [`Self::get_bool`], but `None` when the key is absent.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "bool", other.type_name())),
        }
    }

    /// The value of `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// Like [`Self::get_str`], but `None` when the key is absent.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, "string", other.type_name())),
        }
    }

    fn array(&self, key: &str, expected: &'static str) -> Result<&GgufArray, GgufError> {
        match self.require(key)? {
            GgufValue::Array(a) => Ok(a),
            other => Err(self.wrong_type(key, expected, other.type_name())),
        }
    }

    /// The array at `key` as strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        match self.array(key, "an array of string")? {
            GgufArray::String(v) => Ok(v),
            other => Err(self.wrong_type(key, "an array of string", other.type_name())),
        }
    }

    int_array_getters! {
        get_i32_array, i32, "i32";
        get_u32_array, u32, "u32";
        get_i64_array, i64, "i64";
    }

    /// The array at `key` as f32; float or integer elements are accepted.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        let array = self.array(key, "an array of f32")?;
        match array {
            GgufArray::F32(v) => Ok(v.clone()),
            GgufArray::F64(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            other => match other.integers() {
                Some(ints) => Ok(ints.into_iter().map(|n| n as f32).collect()),
                None => Err(self.wrong_type(key, "an array of f32", other.type_name())),
            },
        }
    }
}

#[cfg(test)]
mod tests;
