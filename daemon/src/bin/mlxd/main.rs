//! `mlxd`: the command people and service managers run.
//!
//! It links no MLX. It checks that a loadable `libmlx` is where the engine will look for it, and
//! then replaces itself with `mlxd-engine` (same directory, same arguments, same process id, so
//! systemd and launchd see one process). A missing or broken library thus gets a message that
//! says what to do instead of the dynamic loader's one-line error.
use std::ffi::{CStr, CString, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// Where the build provisioned libmlx; the engine carries the same path as its run path.
const BUILD_LIB_DIR: &str = env!("MLXD_BUILD_LIB_DIR");
const ENGINE_USAGE: &str = "mlxd: a local LLM daemon on MLX

daemon commands:
  mlxd serve [--config PATH] [--listen ADDR:PORT] [--log-json]   run the daemon
  mlxd doctor                         what MLX this machine runs on
  mlxd generate [--model PATH] PROMPT one local generation without a daemon
  mlxd service install|uninstall|status   run mlxd at login (systemd user unit / launchd agent)";
const LIB_NAME: &str = if cfg!(target_os = "macos") { "libmlx.dylib" } else { "libmlx.so" };

mod service;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("service") {
        std::process::exit(service::main(&args[1..]));
    }
    // Client commands talk to a running daemon and need no MLX at all.
    if args.first().is_some_and(|c| mlxd_client::cli::handles(c)) {
        std::process::exit(mlxd_client::cli::main(&args));
    }
    if matches!(args.first().map(String::as_str), Some("help" | "--help" | "-h")) {
        println!("{}\n\n{}", ENGINE_USAGE, mlxd_client::cli::USAGE);
        return;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| die(&format!("cannot locate myself: {e}")));
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let engine = dir.join("mlxd-engine");
    if !engine.is_file() {
        die(&format!(
            "{} is missing: it is built and installed together with mlxd (cargo build -p mlxd)",
            engine.display()
        ));
    }
    if let Err(msg) = preflight(&dir) {
        die(&msg);
    }
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let err = std::process::Command::new(&engine).args(args).exec();
    die(&format!("could not start {}: {err}", engine.display()));
}

fn die(msg: &str) -> ! {
    eprintln!("mlxd: {msg}");
    std::process::exit(127);
}

/// The search order of the engine's loader: LD_LIBRARY_PATH, then its run paths
/// (`<bin>/../lib`, then the build's cache). The first libmlx found must load.
fn preflight(bin_dir: &Path) -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    dirs.push(bin_dir.join("../lib"));
    dirs.push(PathBuf::from(BUILD_LIB_DIR));
    let Some(lib) = dirs.iter().map(|d| d.join(LIB_NAME)).find(|p| p.exists()) else {
        return Err(format!(
            "{LIB_NAME} was not found (looked in LD_LIBRARY_PATH, {}, {}).\n\
             - from a source checkout: run `./dev run` or `cargo build -p mlxd`, which provisions MLX;\n\
             - from an install: copy the lib/ folder that came with mlxd beside its bin/;\n\
             - to use your own MLX 0.32.2: set LD_LIBRARY_PATH to the folder holding {LIB_NAME}.",
            bin_dir.join("../lib").display(),
            BUILD_LIB_DIR
        ));
    };
    let c = CString::new(lib.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a NUL-terminated path; the handle is released right away, and the
    // process is replaced by exec before anything from the library is used.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            let why = CStr::from_ptr(libc::dlerror()).to_string_lossy().into_owned();
            return Err(format!("{} cannot be loaded: {why}\n{}", lib.display(), hint(&why)));
        }
        libc::dlclose(handle);
    }
    Ok(())
}

fn hint(why: &str) -> &'static str {
    if ["libcuda", "libcudart", "libcublas", "libcudnn", "libnccl", "libnvrtc"].iter().any(|n| why.contains(n)) {
        "This is MLX's CUDA build: install the NVIDIA driver and the CUDA 13 runtime libraries \
         (cuBLAS, cuDNN, NVRTC, NCCL), or use MLX's CPU build: unset LD_LIBRARY_PATH if it points at \
         the CUDA library, or rebuild with MLXD_MLX_BACKEND=cpu."
    } else if why.contains("blas") || why.contains("lapack") || why.contains("gfortran") {
        "A BLAS library it was wired to is gone: install OpenBLAS (apt-get install libopenblas0) \
         or rebuild with MLXD_BLAS=bundled."
    } else {
        "Reinstall mlxd's lib/ folder or rebuild (cargo build -p mlxd); `mlxd-engine doctor` \
         explains more once the library loads."
    }
}
