//! Provisions the MLX shared library and headers the bindings are built against.
//!
//! The wheel is downloaded with pip (which honours the user's index and proxy settings), checked
//! against a pinned sha256, and unpacked once into a cache directory outside `target/`. The
//! wheel's layout (`mlx/lib`, `mlx/include`, `<dist>.libs/` for auditwheel's bundled libraries)
//! is flattened to `lib/` + `include/` so that the same tree can be copied beside an installed
//! `bin/mlxd`, and `libmlx`'s run path is rewritten to `$ORIGIN` to match.

use sha2::{Digest, Sha256};
use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The MLX release mlx-c 0.7.0 is written for. 0.32.4 changed `gather_qmm`'s C++ signature.
pub const MLX_VERSION: &str = "0.32.2";

/// Where the provisioned MLX lives and what it is.
pub struct Mlx {
    /// Directory holding `libmlx.{so,dylib}` and the libraries it needs.
    pub lib_dir: PathBuf,
    /// Directory holding `mlx/mlx.h`.
    pub include_dir: PathBuf,
    /// `cpu`, `cuda`, `metal`, or `custom` for `MLXD_MLX_PREFIX`.
    pub backend: String,
    /// What the CPU library's BLAS calls resolve to.
    pub blas: String,
}

struct Wheel {
    package: &'static str,
    file: &'static str,
    platform: &'static str,
    sha256: &'static str,
}

const CPU_X86_64: Wheel = Wheel {
    package: "mlx-cpu",
    file: "mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl",
    platform: "manylinux_2_35_x86_64",
    sha256: "fc5d31b90fc4f457b2f9614ed45651a567d22a6a11a03d114a90a4e10bdd8878",
};

const CUDA_X86_64: Wheel = Wheel {
    package: "mlx-cuda-13",
    file: "mlx_cuda_13-0.32.2-py3-none-manylinux_2_35_x86_64.whl",
    platform: "manylinux_2_35_x86_64",
    sha256: "335094ccd1c0c6dc3e09c8caba207c8180602bacc0c38ba20c1d81e9456ab394",
};

/// The macOS 14 build loads on macOS 14 and later.
const METAL_ARM64: Wheel = Wheel {
    package: "mlx-metal",
    file: "mlx_metal-0.32.2-py3-none-macosx_14_0_arm64.whl",
    platform: "macosx_14_0_arm64",
    sha256: "3825fff379dbc107dd3413e564a06caeaa24819910ec49c0439e454c06a1b9b8",
};

/// Finds or provisions MLX according to the environment (see `main.rs`).
pub fn mlx() -> Result<Mlx, String> {
    let backend = backend()?;
    if let Some(prefix) = env::var_os("MLXD_MLX_PREFIX") {
        return custom(PathBuf::from(prefix), backend);
    }
    let wheel = wheel_for(&backend)?;
    let root = cache_root()?.join(format!("mlx-{MLX_VERSION}-{backend}"));
    if !root.join(".complete").is_file() {
        let whl = download(wheel, &cache_root()?.join("wheels"))?;
        unpack(&whl, &root).map_err(|e| format!("unpacking {}: {e}", whl.display()))?;
    }
    let lib_dir = root.join("lib");
    let blas = if backend == "cpu" {
        wire_blas(&lib_dir).map_err(|e| format!("choosing BLAS in {}: {e}", lib_dir.display()))?
    } else {
        "n/a".to_string()
    };
    Ok(Mlx { lib_dir, include_dir: root.join("include"), backend, blas })
}

fn backend() -> Result<String, String> {
    if let Ok(b) = env::var("MLXD_MLX_BACKEND") {
        return match b.as_str() {
            "cpu" | "cuda" | "metal" => Ok(b),
            other => Err(format!("MLXD_MLX_BACKEND={other:?} is not one of cpu, cuda, metal")),
        };
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        return Ok("cuda".into());
    }
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    Ok(if os == "macos" { "metal" } else { "cpu" }.into())
}

fn wheel_for(backend: &str) -> Result<&'static Wheel, String> {
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    match (backend, os.as_str(), arch.as_str()) {
        ("cpu", "linux", "x86_64") => Ok(&CPU_X86_64),
        ("cuda", "linux", "x86_64") => Ok(&CUDA_X86_64),
        ("metal", "macos", "aarch64") => Ok(&METAL_ARM64),
        _ => Err(format!(
            "no pinned MLX {MLX_VERSION} wheel for backend {backend} on {os}/{arch}; \
             install MLX yourself and set MLXD_MLX_PREFIX to its prefix (lib/ and include/)"
        )),
    }
}

fn custom(prefix: PathBuf, backend: String) -> Result<Mlx, String> {
    let lib_dir = prefix.join("lib");
    let found = ["libmlx.so", "libmlx.dylib"].iter().any(|f| lib_dir.join(f).exists());
    if !found || !prefix.join("include/mlx/mlx.h").exists() {
        return Err(format!(
            "MLXD_MLX_PREFIX={} must hold lib/libmlx.so (or .dylib) and include/mlx/mlx.h",
            prefix.display()
        ));
    }
    let backend = if env::var_os("MLXD_MLX_BACKEND").is_some() { backend } else { "custom".into() };
    Ok(Mlx { lib_dir, include_dir: prefix.join("include"), backend, blas: "as installed".into() })
}

fn cache_root() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("MLXD_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("mlxd"));
    }
    env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/mlxd"))
        .ok_or_else(|| "neither MLXD_CACHE_DIR, XDG_CACHE_HOME nor HOME is set".to_string())
}

fn sha256_of(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = fs::File::open(path)?;
    io::copy(&mut file, &mut hasher)?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn download(wheel: &Wheel, dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join(wheel.file);
    if path.is_file() && sha256_of(&path).ok().as_deref() == Some(wheel.sha256) {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let spec = format!("{}=={MLX_VERSION}", wheel.package);
    println!("cargo:warning=downloading {spec} ({}) into {}", wheel.platform, dir.display());
    let python = env::var("MLXD_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"])
        .args(["--python-version", "3.12", "--implementation", "cp"])
        .args(["--platform", wheel.platform, "--dest"])
        .arg(dir)
        .arg(&spec)
        .status()
        .map_err(|e| format!("running `{python} -m pip download {spec}`: {e}; install Python 3 with pip, or set MLXD_MLX_PREFIX"))?;
    if !status.success() {
        return Err(format!(
            "`{python} -m pip download {spec}` failed ({status}); without network, set MLXD_MLX_PREFIX to an MLX install"
        ));
    }
    let got = sha256_of(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    if got != wheel.sha256 {
        let _ = fs::remove_file(&path);
        return Err(format!("{} has sha256 {got}, expected {}", wheel.file, wheel.sha256));
    }
    Ok(path)
}

/// Unpacks into a private temporary directory and renames it into place, so concurrent builds
/// (debug and release at once) never see a half-written tree.
fn unpack(whl: &Path, root: &Path) -> io::Result<()> {
    let tmp = root.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let raw = tmp.join("wheel");
    fs::create_dir_all(&raw)?;
    let python = env::var("MLXD_PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(python).args(["-m", "zipfile", "-e"]).arg(whl).arg(&raw).status()?;
    if !status.success() {
        return Err(io::Error::other(format!("python3 -m zipfile -e failed ({status})")));
    }
    let lib = tmp.join("lib");
    fs::create_dir_all(&lib)?;
    move_children(&raw.join("mlx/lib"), &lib)?;
    // auditwheel's bundled dependencies (reference BLAS, gfortran) sit in `<dist>.libs/`.
    let mut bundled = None;
    for entry in fs::read_dir(&raw)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".libs") {
            move_children(&entry.path(), &lib)?;
            bundled = Some(name);
        }
    }
    fs::rename(raw.join("mlx/include"), tmp.join("include"))?;
    if let Some(dist_libs) = bundled {
        patch_origin_rpath(&lib.join("libmlx.so"), &format!("$ORIGIN/../../{dist_libs}"))?;
    }
    fs::remove_dir_all(&raw)?;
    fs::write(tmp.join(".complete"), MLX_VERSION)?;
    match fs::rename(&tmp, root) {
        Ok(()) => Ok(()),
        // Another build finished first; its tree is as good as ours.
        Err(_) if root.join(".complete").is_file() => fs::remove_dir_all(&tmp),
        Err(e) => Err(e),
    }
}

fn move_children(from: &Path, to: &Path) -> io::Result<()> {
    if !from.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::rename(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Rewrites `libmlx.so`'s run path from the wheel's `$ORIGIN/../../<dist>.libs` to `$ORIGIN`,
/// in place: the new string is shorter, so it is NUL-padded inside the same `.dynstr` slot and no
/// ELF offsets move. This saves a patchelf dependency.
fn patch_origin_rpath(lib: &Path, old: &str) -> io::Result<()> {
    let mut bytes = fs::read(lib)?;
    let needle: Vec<u8> = old.bytes().chain([0]).collect();
    let Some(at) = bytes.windows(needle.len()).position(|w| w == needle.as_slice()) else {
        return Err(io::Error::other(format!("{} has no run path {old}", lib.display())));
    };
    let new = b"$ORIGIN";
    bytes[at..at + needle.len()].fill(0);
    bytes[at..at + new.len()].copy_from_slice(new);
    fs::write(lib, bytes)
}

/// The CPU wheel bundles netlib's reference BLAS (3 GFLOP/s on a 1024^3 f32 matmul, against
/// 134 GFLOP/s for OpenBLAS on the same 2-core machine). Where OpenBLAS is installed, the bundled
/// names become links to it; the originals stay in `lib/bundled/` for `MLXD_BLAS=bundled`.
fn wire_blas(lib: &Path) -> io::Result<String> {
    let bundled_dir = lib.join("bundled");
    fs::create_dir_all(&bundled_dir)?;
    for entry in fs::read_dir(lib)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_blas = name.starts_with("libblas-") || name.starts_with("liblapack-");
        if is_blas && entry.file_type()?.is_file() {
            fs::rename(entry.path(), bundled_dir.join(&name))?;
        }
    }
    let want_bundled = env::var("MLXD_BLAS").map(|v| v == "bundled").unwrap_or(false);
    let openblas = if want_bundled { None } else { find_openblas() };
    for entry in fs::read_dir(&bundled_dir)? {
        let name = entry?.file_name();
        let target = match &openblas {
            Some(path) => path.clone(),
            None => bundled_dir.join(&name),
        };
        let link = lib.join(&name);
        let tmp = lib.join(format!(".{}.{}", name.to_string_lossy(), std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)?;
        fs::rename(&tmp, &link)?;
    }
    Ok(match openblas {
        Some(path) => format!("openblas ({})", path.display()),
        None => "reference BLAS bundled with the wheel".into(),
    })
}

fn find_openblas() -> Option<PathBuf> {
    let known = [
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ];
    if let Some(p) = known.iter().map(PathBuf::from).find(|p| p.exists()) {
        return Some(p);
    }
    let out = Command::new("ldconfig").arg("-p").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("libopenblas.so.0"))
        .find_map(|l| l.split("=>").nth(1).map(|p| PathBuf::from(p.trim())))
}
