//! safetensors header checks, run on every shard before MLX's own loader reads it.
//!
//! MLX parses the header in C++ and reports a bad file as one opaque exception; this reads the
//! same header in Rust first, so a corrupt or hostile shard is refused with a [`HeaderError`]
//! naming the file, the tensor and the field, and nothing is allocated beyond a bounded header.
//! Only the header is read; tensor data stays on disk. [`parse`] takes bytes, for fuzzing.
//!
//! Layout: a little-endian u64 `N`, then `N` bytes of UTF-8 JSON (an object whose keys are
//! tensor names, each `{"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}`, plus an
//! optional `"__metadata__"` object of strings), then the data section, to which the offsets
//! are relative.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Header bytes beyond which a file is refused: the limit of Hugging Face's `safetensors` crate.
/// Real headers are well under 1 MiB (a few hundred bytes per tensor).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why a safetensors header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Opening or reading the file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The 8-byte header length, or the header itself, is missing, too long or not JSON.
    #[error("{}: {problem}", .path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// One tensor's entry is malformed or points outside the data section.
    #[error("{}: tensor `{tensor}`: `{field}` {problem}", .path.display())]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The field of its entry (`dtype`, `shape`, `data_offsets`).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

/// One tensor's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// Its name.
    pub name: String,
    /// The safetensors dtype (`F16`, `BF16`, `U32`).
    pub dtype: String,
    /// The shape, slowest-varying first.
    pub shape: Vec<u64>,
    /// Start and end of its bytes, relative to the data section.
    pub data_offsets: (u64, u64),
}

/// A checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors in name order.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` (MLX writes `{"format": "mlx"}`).
    pub metadata: BTreeMap<String, String>,
    /// Absolute file offset of the data section (8 + the header length).
    pub data_offset: u64,
}

/// Bytes per element of each dtype MLX 0.32 loads (its `dtype_from_safetensor_str`).
fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" | "C64" => 8,
        _ => return None,
    })
}

const DTYPES: &str = "BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F8_E4M3, F8_E8M0, F16, BF16, F32, F64, C64";

/// Reads and checks the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    let io = |source| HeaderError::Io { path: path.into(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    read_from(file, len, path)
}

/// Checks a whole safetensors file held in memory (errors call it `<memory>`).
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    read_from(bytes, bytes.len() as u64, Path::new("<memory>"))
}

/// Reads the header from `reader`, positioned at the start of a file of `file_len` bytes;
/// `path` is only used in messages. Reads no further than the end of the header.
pub fn read_from<R: Read>(mut reader: R, file_len: u64, path: &Path) -> Result<Header, HeaderError> {
    let bad = |problem: String| HeaderError::BadHeader { path: path.into(), problem };
    let read_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::UnexpectedEof => bad(format!("the file ends within its {file_len} bytes' header")),
        _ => HeaderError::Io { path: path.into(), source },
    };
    if file_len < 8 {
        return Err(bad(format!("{file_len} bytes is too short for the 8-byte header length")));
    }
    let mut len = [0; 8];
    reader.read_exact(&mut len).map_err(read_error)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("the header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")));
    }
    if n > file_len - 8 {
        return Err(bad(format!(
            "the header length {n} runs past the end of the file, which has {file_len} bytes (truncated download?)"
        )));
    }
    let mut json = vec![0; n as usize];
    reader.read_exact(&mut json).map_err(read_error)?;
    let json = std::str::from_utf8(&json).map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(json).map_err(|e| bad(format!("the header is not valid JSON: {e}")))?;
    let Value::Object(entries) = value else {
        return Err(bad("the header must be a JSON object".into()));
    };
    let data_offset = 8 + n;
    let data_len = file_len - data_offset;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut metadata = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            // MLX's own writer (mlx.core.save_safetensors without metadata) stores `null`.
            if entry.is_null() {
                continue;
            }
            let Value::Object(map) = entry else {
                return Err(bad("`__metadata__` must be an object of strings".into()));
            };
            for (key, value) in map {
                let Value::String(value) = value else {
                    return Err(bad(format!("`__metadata__.{key}` must be a string, not {value}")));
                };
                metadata.insert(key, value);
            }
            continue;
        }
        tensors.push(tensor_entry(name, &entry, data_len, path)?);
    }
    Ok(Header { tensors, metadata, data_offset })
}

/// Checks one entry: known dtype, a shape whose byte count fits, offsets inside the data
/// section that span exactly that many bytes.
fn tensor_entry(name: String, entry: &Value, data_len: u64, path: &Path) -> Result<TensorEntry, HeaderError> {
    let bad = |field: &'static str, problem: String| HeaderError::BadTensor {
        path: path.into(),
        tensor: name.clone(),
        field,
        problem,
    };
    let Value::Object(fields) = entry else {
        return Err(bad("dtype", "is missing: the entry is not an object".into()));
    };
    let dtype = match fields.get("dtype") {
        Some(Value::String(d)) => d.clone(),
        Some(other) => return Err(bad("dtype", format!("must be a string, not {other}"))),
        None => return Err(bad("dtype", "is missing".into())),
    };
    let size =
        dtype_size(&dtype).ok_or_else(|| bad("dtype", format!("is {dtype:?}, which MLX cannot load ({DTYPES})")))?;
    let integers = |field: &'static str| -> Result<Vec<u64>, HeaderError> {
        let Some(Value::Array(items)) = fields.get(field) else {
            return Err(bad(field, "must be an array of non-negative integers".into()));
        };
        items
            .iter()
            .map(|v| v.as_u64().ok_or_else(|| bad(field, format!("has {v}, not a non-negative integer"))))
            .collect()
    };
    let shape = integers("shape")?;
    let n_bytes = shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape", format!("{shape:?} of {dtype} overflows the byte count")))?;
    let offsets = integers("data_offsets")?;
    let &[begin, end] = offsets.as_slice() else {
        return Err(bad("data_offsets", format!("must hold 2 entries, has {}", offsets.len())));
    };
    if begin > end || end > data_len {
        return Err(bad(
            "data_offsets",
            format!("[{begin}, {end}] is not a range within the data section of {data_len} bytes"),
        ));
    }
    if end - begin != n_bytes {
        return Err(bad(
            "data_offsets",
            format!("[{begin}, {end}] spans {} bytes, but shape {shape:?} of {dtype} needs {n_bytes}", end - begin),
        ));
    }
    Ok(TensorEntry { name, dtype, shape, data_offsets: (begin, end) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with the given JSON header and `data` bytes after it.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_header_parses() {
        let h = r#"{"__metadata__":{"format":"mlx"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[8,20]},"a":{"dtype":"U32","shape":[2],"data_offsets":[0,8]},"s":{"dtype":"F32","shape":[],"data_offsets":[20,24]}}  "#;
        let parsed = parse(&file(h, 24)).unwrap();
        assert_eq!(parsed.metadata["format"], "mlx");
        assert_eq!(parsed.data_offset, 8 + h.len() as u64);
        let names: Vec<_> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "s"]);
        assert_eq!(parsed.tensors[1].shape, [2, 3]);
        assert_eq!(parsed.tensors[1].data_offsets, (8, 20));
    }

    #[test]
    fn each_problem_names_the_field() {
        let cases = [
            (vec![1, 2, 3], "too short"),
            ((200u64 << 20).to_le_bytes().to_vec(), "exceeds the limit"),
            (file("{}", 0)[..9].to_vec(), "runs past the end"),
            (file("[1]", 0), "must be a JSON object"),
            (file("{\"a\":", 0), "not valid JSON"),
            (file(r#"{"__metadata__":{"k":1}}"#, 0), "`__metadata__.k`"),
            (file(r#"{"a":{"shape":[1],"data_offsets":[0,4]}}"#, 4), "tensor `a`: `dtype` is missing"),
            (file(r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,4]}}"#, 4), "`dtype` is \"Q4\""),
            (file(r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#, 4), "`shape` has -1"),
            (file(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#, 4), "overflows"),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#, 4), "must hold 2 entries"),
            (file(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, 4), "not a range within"),
            (file(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 4), "needs 8"),
        ];
        for (bytes, needle) in cases {
            let e = err(&bytes);
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn read_header_reads_only_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, file(r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, 4)).unwrap();
        assert_eq!(read_header(&path).unwrap().tensors[0].name, "w");
        std::fs::write(&path, file(r#"{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#, 2)).unwrap();
        let e = read_header(&path).unwrap_err().to_string();
        assert!(e.contains("m.safetensors") && e.contains("tensor `w`"), "{e}");
    }
}
