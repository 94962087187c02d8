//! Run paths for every binary of this package (the daemon, its tests and benchmarks).
//!
//! `$ORIGIN/../lib` serves an installed layout (`bin/mlxd` beside `lib/libmlx.so`); the absolute
//! path serves the build tree, where libmlx stays in mlx-sys's cache. They are RUNPATH entries,
//! so `LD_LIBRARY_PATH` still wins: that is how one build runs on MLX's CUDA library.
fn main() {
    let libdir = std::env::var("DEP_MLX_LIBDIR").expect("mlx-sys publishes its library dir");
    let origin = if cfg!(target_os = "macos") { "@executable_path" } else { "$ORIGIN" };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{origin}/../lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
    println!("cargo:rustc-env=MLXD_BUILD_LIB_DIR={libdir}");
    println!("cargo:rerun-if-env-changed=DEP_MLX_LIBDIR");
}
