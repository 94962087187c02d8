//! Build script of mlxd's `mlx-sys` adapter.
//!
//! Three steps, one module each:
//! 1. [`provision`]: find MLX (the pinned PyPI wheel, downloaded once into a cache outside
//!    `target/` and checked by sha256, or an install named by `MLXD_MLX_PREFIX`) and lay it out as
//!    one flat `lib/` with an `$ORIGIN` run path, wired to an optimized BLAS where one exists.
//! 2. [`mlxc`]: obtain mlx-c's sources from the crates.io `mlx-sys` 0.7.0 package (cargo fetches
//!    it), copy them into `OUT_DIR`, adapt them to non-ARM compilers, and build them with CMake
//!    (`MLX_C_USE_SYSTEM_MLX=ON`) against that MLX.
//! 3. [`bindings`]: generate the Rust bindings mlx-rs expects.
//!
//! Environment (each also a `rerun-if-env-changed`):
//! - `MLXD_MLX_BACKEND` = `cpu` | `cuda` | `metal`: which wheel (default: metal on macOS, cpu
//!   elsewhere; the `cuda` cargo feature means `cuda`).
//! - `MLXD_MLX_PREFIX`: an existing MLX install (`lib/libmlx.*`, `include/mlx/`); no download.
//! - `MLXD_CACHE_DIR`: cache root (default `$XDG_CACHE_HOME/mlxd` or `~/.cache/mlxd`).
//! - `MLXD_MLX_C_SRC`: an mlx-c source tree to use instead of the crates.io package.
//! - `MLXD_BLAS` = `auto` | `bundled`: `auto` wires the CPU wheel to OpenBLAS when installed.

#[path = "bindings.rs"]
mod bindings;
#[path = "mlxc.rs"]
mod mlxc;
#[path = "provision.rs"]
mod provision;

use std::env;
use std::path::PathBuf;

fn main() {
    for var in [
        "MLXD_MLX_BACKEND",
        "MLXD_MLX_PREFIX",
        "MLXD_CACHE_DIR",
        "MLXD_MLX_C_SRC",
        "MLXD_BLAS",
        "XDG_CACHE_HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mlx = provision::mlx().unwrap_or_else(|e| fail(&e));
    let src = mlxc::sources(&out_dir).unwrap_or_else(|e| fail(&e));
    let mlxc_lib = mlxc::build(&src, &mlx, &out_dir).unwrap_or_else(|e| fail(&e));
    bindings::generate(&src, &out_dir).unwrap_or_else(|e| fail(&e));

    println!("cargo:rustc-link-search=native={}", mlxc_lib.display());
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-search=native={}", mlx.lib_dir.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if cfg!(target_vendor = "apple") {
        println!("cargo:rustc-link-lib=dylib=c++");
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }

    // Dependents that list this crate directly read these as DEP_MLX_*: the daemon's build script
    // turns LIBDIR into run paths, `mlxd doctor` reports the rest.
    println!("cargo:libdir={}", mlx.lib_dir.display());
    println!("cargo:include={}", mlx.include_dir.display());
    println!("cargo:backend={}", mlx.backend);
    println!("cargo:rustc-env=MLXD_MLX_VERSION={}", provision::MLX_VERSION);
    println!("cargo:rustc-env=MLXD_MLX_BACKEND={}", mlx.backend);
    println!("cargo:rustc-env=MLXD_MLX_LIB_DIR={}", mlx.lib_dir.display());
    println!("cargo:rustc-env=MLXD_MLX_BLAS={}", mlx.blas);
}

/// Build scripts report through panics; this keeps the message first and readable.
fn fail(msg: &str) -> ! {
    eprintln!("\nmlx-sys (mlxd adapter): {msg}\n");
    panic!("mlx-sys build failed: {msg}");
}
