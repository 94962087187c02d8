//! The one gate through which sampled values cross from the device to the host.
//!
//! Decode speed depends on moving one token id per sequence per step and nothing else (issue 4:
//! a host round trip of the logits once halved it). Every read goes through [`host_read`], which
//! counts reads and bytes and refuses anything a step should never read: more than
//! [`MAX_HOST_READ_ELEMENTS`] elements (so a `[B, V]` array cannot pass), or a float array where
//! ids are expected. A unit test below fails the build's tests if any other file of `sampling/`,
//! `engine/` or `plugins/` (the sampler-plugin host, whose operation table has no read either)
//! calls an MLX host-read method.

use super::params::SamplingError;
use mlx_rs::{Array, ArrayElement, Dtype};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest array (in elements) the gate lets through: a batch's ids plus its top-20 logprobs
/// fit many times over; any vocabulary-sized row does not.
pub const MAX_HOST_READ_ELEMENTS: usize = 4096;

/// Counters of the gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostReadStats {
    /// Arrays read to the host.
    pub reads: u64,
    /// Bytes those arrays held.
    pub bytes: u64,
    /// Reads refused.
    pub refused: u64,
    /// Reads of an array that was not row-contiguous or not of the type read, so a copy had to
    /// be made on the device first: queued behind everything the stream held by then (in
    /// decode, the next step), which the read then waited for. Decode's reads need none.
    pub copies: u64,
}

static READS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static COPIES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static THREAD: Cell<HostReadStats> = const { Cell::new(HostReadStats { reads: 0, bytes: 0, refused: 0, copies: 0 }) };
}

/// Reads and bytes through the gate since the process started, over all threads.
pub fn host_read_stats() -> HostReadStats {
    HostReadStats {
        reads: READS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
        copies: COPIES.load(Ordering::Relaxed),
    }
}

/// The same counters for the calling thread only (tests run in parallel threads; a model's
/// MLX work runs on one thread).
pub fn thread_host_read_stats() -> HostReadStats {
    THREAD.with(Cell::get)
}

/// Reads sampled token ids (`[B]` or `[B, n]`, any integer dtype) to the host.
pub fn read_ids(a: &Array) -> Result<Vec<u32>, SamplingError> {
    if !is_integer(a.dtype()) {
        return Err(refuse(a, "token ids must have an integer dtype"));
    }
    host_read::<u32>(a)
}

/// Reads log-probabilities (`[B]` or `[B, n]`) to the host.
pub fn read_logprobs(a: &Array) -> Result<Vec<f32>, SamplingError> {
    host_read::<f32>(a)
}

/// Any signed or unsigned integer dtype.
pub(crate) fn is_integer(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::Uint8
            | Dtype::Uint16
            | Dtype::Uint32
            | Dtype::Uint64
            | Dtype::Int8
            | Dtype::Int16
            | Dtype::Int32
            | Dtype::Int64
    )
}

fn refuse(a: &Array, why: &'static str) -> SamplingError {
    REFUSED.fetch_add(1, Ordering::Relaxed);
    THREAD.with(|t| {
        let mut s = t.get();
        s.refused += 1;
        t.set(s);
    });
    SamplingError::HostReadRefused { shape: a.shape().to_vec(), dtype: format!("{:?}", a.dtype()), why }
}

/// The only host read in `sampling/` and `engine/` (the guard test below allows it here alone).
fn host_read<T: ArrayElement + Clone>(a: &Array) -> Result<Vec<T>, SamplingError> {
    if a.size() > MAX_HOST_READ_ELEMENTS {
        return Err(refuse(a, "larger than MAX_HOST_READ_ELEMENTS; logits never leave the device"));
    }
    if a.size() == 0 {
        return Ok(Vec::new()); // nothing crosses
    }
    let bytes = (a.size() * a.item_size()) as u64;
    // Wait for `a` itself (an array `async_eval` queued waits for its own step only) and read
    // it as it lies. Any operation made here (a contiguous copy, a cast) would be queued behind
    // everything the stream holds by now, usually the next decode step, and the read would wait
    // for all of it.
    a.eval()?;
    let mut row_contiguous = false;
    // SAFETY: reads the flags of a live, evaluated array.
    let rc = unsafe { mlx_sys::_mlx_array_is_row_contiguous(&mut row_contiguous, a.as_ptr()) };
    let conversion = |e: mlx_rs::error::AsSliceError| mlx_rs::error::Exception::custom(e.to_string());
    let copied = !(rc == 0 && row_contiguous && a.dtype() == T::DTYPE);
    let values = if copied {
        a.contiguous()?.to_vec_cast::<T>().map_err(|e| mlx_rs::error::Exception::custom(e.to_string()))?
    } else {
        a.try_as_slice::<T>().map_err(conversion)?.to_vec()
    };
    READS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(bytes, Ordering::Relaxed);
    COPIES.fetch_add(u64::from(copied), Ordering::Relaxed);
    THREAD.with(|t| {
        let mut s = t.get();
        s.reads += 1;
        s.bytes += bytes;
        s.copies += u64::from(copied);
        t.set(s);
    });
    Ok(values)
}
// host_read: end

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// MLX methods that copy device data to the host. Spelled in pieces so that this file's
    /// own source does not match them. (A plain `.to_vec()` is a slice method: an `Array`
    /// reaches a slice only through the `as_slice` family, listed here.)
    const HOST_READS: &[&str] = &[
        concat!(".it", "em("),
        concat!(".it", "em::<"),
        concat!("it", "em_exact"),
        concat!("it", "em_cast"),
        concat!("try_", "item"),
        concat!("as_", "slice"),
        concat!("to_vec_", "exact"),
        concat!("to_vec_", "cast"),
        concat!("array_", "data"),
        concat!("array_", "item"),
    ];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Fails if any file of `sampling/`, `engine/` or `plugins/` reads an array to the host
    /// anywhere but in `host_read` (from its `fn` line to the `host_read: end` marker).
    #[test]
    fn host_reads_only_through_the_gate() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src.join("sampling"), &mut files);
        rust_files(&src.join("engine"), &mut files);
        rust_files(&src.join("plugins"), &mut files);
        assert!(files.iter().any(|f| f.ends_with("plugins/host.rs")), "the plugin host is scanned");
        assert!(files.len() >= 9, "found only {files:?}");
        let mut offences = Vec::new();
        let mut inside_gate = 0;
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read source");
            let mut in_gate = false;
            for (n, line) in text.lines().enumerate() {
                let gate_file = file.ends_with("sampling/read.rs");
                if gate_file && line.starts_with("fn host_read<") {
                    in_gate = true;
                }
                if gate_file && line.starts_with(concat!("// host_read", ": end")) {
                    in_gate = false;
                }
                let code = line.split("//").next().unwrap_or("");
                for pat in HOST_READS {
                    if code.contains(pat) {
                        if in_gate {
                            inside_gate += 1;
                        } else {
                            offences.push(format!("{}:{}: `{}` in {}", file.display(), n + 1, pat, line.trim()));
                        }
                    }
                }
            }
        }
        // The scanner must see the gate's own read, or it is not looking at real code.
        assert!(inside_gate >= 1, "the scan found no host read inside host_read itself");
        assert!(offences.is_empty(), "host reads outside sampling::read::host_read:\n{}", offences.join("\n"));
    }
}
