//! Obtains mlx-c's sources from crates.io, adapts them to the host compiler, and builds them.
//!
//! mlx-c is never committed to this repository: the crates.io `mlx-sys` 0.7.0 package carries it
//! under `src/mlx-c`, and cargo fetches and unpacks that package when asked for the metadata of a
//! throw-away manifest that depends on it. The sources are then copied into `OUT_DIR` and two
//! portability fixes are applied to the copy:
//! - `mlx/c/half.h` declares `float16_t` / `bfloat16_t` only on ARM. Elsewhere they become 16-bit
//!   storage types: mlx-c only passes them by pointer, so the bit pattern is all that matters.
//! - `mlx/c/private/io.h` uses `std::format`, which GCC 12's libstdc++ lacks; calls are routed to
//!   a small `{}`-substituting helper when `<format>` is unavailable.

use crate::provision::Mlx;
use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The crates.io package that carries mlx-c 0.7.0's sources.
const CARRIER: &str = "mlx-sys";
const CARRIER_VERSION: &str = "=0.7.0";

/// Returns an adapted copy of mlx-c's source tree inside `out_dir`.
pub fn sources(out_dir: &Path) -> Result<PathBuf, String> {
    let original = match env::var_os("MLXD_MLX_C_SRC") {
        Some(dir) => PathBuf::from(dir),
        None => fetch_carrier(out_dir)?.join("src/mlx-c"),
    };
    if !original.join("mlx/c/mlx.h").is_file() {
        return Err(format!("{} is not an mlx-c source tree (no mlx/c/mlx.h)", original.display()));
    }
    let copy = out_dir.join("mlx-c");
    let _ = fs::remove_dir_all(&copy);
    copy_tree(&original, &copy).map_err(|e| format!("copying {}: {e}", original.display()))?;
    adapt_half_h(&copy.join("mlx/c/half.h")).map_err(|e| format!("adapting half.h: {e}"))?;
    adapt_io_h(&copy.join("mlx/c/private/io.h")).map_err(|e| format!("adapting io.h: {e}"))?;
    Ok(copy)
}

/// Asks cargo for the metadata of a one-dependency manifest; cargo downloads and unpacks the
/// package into its registry cache and reports its `manifest_path`.
fn fetch_carrier(out_dir: &Path) -> Result<PathBuf, String> {
    let dir = out_dir.join("mlx-c-carrier");
    fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
    // `[workspace]` makes this its own root: OUT_DIR lies inside our workspace's target/.
    let manifest = format!(
        "[package]\nname = \"mlxd-mlx-c-carrier\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         [dependencies]\n{CARRIER} = \"{CARRIER_VERSION}\"\n[workspace]\n"
    );
    fs::write(dir.join("Cargo.toml"), manifest).map_err(|e| e.to_string())?;
    fs::write(dir.join("src/lib.rs"), "").map_err(|e| e.to_string())?;
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        // A nested cargo must not inherit the outer build's target-specific settings.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTC_WRAPPER")
        .output()
        .map_err(|e| format!("running {cargo} metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo could not fetch {CARRIER} {CARRIER_VERSION} (which carries mlx-c's sources): {}\n\
             offline? point MLXD_MLX_C_SRC at an mlx-c 0.7.0 source tree",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))?;
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == CARRIER && p["version"] == "0.7.0")
        .and_then(|p| p["manifest_path"].as_str())
        .and_then(|m| Path::new(m).parent().map(Path::to_path_buf))
        .ok_or_else(|| format!("cargo metadata did not list {CARRIER} 0.7.0"))
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// Adds a non-ARM branch after the ARM typedefs, so the `HAS_*` blocks are declared everywhere.
fn adapt_half_h(path: &Path) -> io::Result<()> {
    let text = fs::read_to_string(path)?;
    let marker = "#ifdef __cplusplus\n}\n#endif";
    let fallback = "#ifndef HAS_FLOAT16\n#define HAS_FLOAT16\n#include <stdint.h>\n\
                    typedef uint16_t float16_t; /* mlxd: IEEE half, storage only */\n#endif\n\
                    #ifndef HAS_BFLOAT16\n#define HAS_BFLOAT16\n#include <stdint.h>\n\
                    typedef uint16_t bfloat16_t; /* mlxd: bfloat16, storage only */\n#endif\n\n";
    let Some(at) = text.rfind(marker) else {
        return Err(io::Error::other("closing extern \"C\" block not found"));
    };
    let patched = format!("{}{fallback}{}", &text[..at], &text[at..]);
    fs::write(path, patched)
}

fn adapt_io_h(path: &Path) -> io::Result<()> {
    let text = fs::read_to_string(path)?;
    if !text.contains("std::format(") {
        return Ok(());
    }
    let helper = r#"
// mlxd: GCC 12's libstdc++ has no <format>; this covers the "{}" placeholders used below.
#include <sstream>
#include <string>
#if __has_include(<format>)
#include <format>
#endif
namespace mlxd_compat {
#if defined(__cpp_lib_format)
template <typename... Args>
std::string format(std::format_string<Args...> fmt, Args&&... args) {
  return std::format(fmt, std::forward<Args>(args)...);
}
#else
inline void format_rest(std::ostringstream& os, const char* fmt) { os << fmt; }
template <typename T, typename... Args>
void format_rest(std::ostringstream& os, const char* fmt, T&& first, Args&&... rest) {
  for (; *fmt; ++fmt) {
    if (fmt[0] == '{' && fmt[1] == '}') {
      os << first;
      format_rest(os, fmt + 2, std::forward<Args>(rest)...);
      return;
    }
    os << *fmt;
  }
}
template <typename... Args>
std::string format(const char* fmt, Args&&... args) {
  std::ostringstream os;
  format_rest(os, fmt, std::forward<Args>(args)...);
  return os.str();
}
#endif
} // namespace mlxd_compat
"#;
    // Insert after the include guard / first include block, before any use.
    let first_use = text.find("std::format(").unwrap_or(0);
    let insert_at = text[..first_use].rfind("#include").map(|i| {
        i + text[i..].find('\n').map(|n| n + 1).unwrap_or(0)
    });
    let insert_at = insert_at.unwrap_or(0);
    let body = text[insert_at..].replace("std::format(", "mlxd_compat::format(");
    fs::write(path, format!("{}{helper}{body}", &text[..insert_at]))
}

/// Builds mlx-c as a static library against the provisioned MLX; returns its library directory.
pub fn build(src: &Path, mlx: &Mlx, out_dir: &Path) -> Result<PathBuf, String> {
    let config_dir = out_dir.join("mlx-cmake");
    write_mlx_config(&config_dir, mlx).map_err(|e| format!("writing MLXConfig.cmake: {e}"))?;
    let mut cfg = cmake::Config::new(src);
    cfg.define("MLX_C_USE_SYSTEM_MLX", "ON")
        .define("MLX_DIR", &config_dir)
        .define("MLX_C_BUILD_EXAMPLES", "OFF")
        .define("BUILD_SHARED_LIBS", "OFF")
        .define("CMAKE_POSITION_INDEPENDENT_CODE", "ON")
        // mlx-c is a thin shim; debug builds of it buy nothing and cost decode speed.
        .profile("Release")
        .out_dir(out_dir.join("mlx-c-build"));
    let dst = cfg.build();
    for sub in ["lib", "lib64"] {
        let dir = dst.join(sub);
        if dir.join("libmlxc.a").is_file() {
            return Ok(dir);
        }
    }
    Err(format!("mlx-c built, but no libmlxc.a under {}", dst.display()))
}

/// A minimal imported-target config. The wheels' own `MLXConfig.cmake` is not used: the CUDA
/// one demands nvcc and cuDNN at configure time, which a build machine need not have, and mlx-c
/// only needs the headers and the library's location.
fn write_mlx_config(dir: &Path, mlx: &Mlx) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let lib = ["libmlx.so", "libmlx.dylib"]
        .iter()
        .map(|f| mlx.lib_dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| io::Error::other(format!("no libmlx in {}", mlx.lib_dir.display())))?;
    let cmake_path = |p: &Path| p.display().to_string().replace('\\', "/");
    let text = format!(
        "# Generated by mlxd's mlx-sys build script.\n\
         if(NOT TARGET mlx)\n\
           add_library(mlx SHARED IMPORTED)\n\
           set_target_properties(mlx PROPERTIES\n\
             IMPORTED_LOCATION \"{lib}\"\n\
             IMPORTED_NO_SONAME FALSE\n\
             INTERFACE_INCLUDE_DIRECTORIES \"{inc}\")\n\
         endif()\n\
         set(MLX_FOUND TRUE)\n\
         set(MLX_LIBRARIES mlx)\n\
         set(MLX_INCLUDE_DIRS \"{inc}\")\n",
        lib = cmake_path(&lib),
        inc = cmake_path(&mlx.include_dir),
    );
    fs::write(dir.join("MLXConfig.cmake"), text)
}
