//! Compiles `epsilon.c` against `plugin-api/include/mlxd_sampler.h` into a shared library with
//! the `cc` crate's C compiler; `src/lib.rs` exposes its path.
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let ext = if cfg!(target_os = "macos") { "dylib" } else { "so" };
    let lib = out.join(format!("libmlxd_epsilon.{ext}"));
    let include = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
        .join("../../plugin-api/include");
    let mut cmd = cc::Build::new().get_compiler().to_command();
    cmd.arg(if cfg!(target_os = "macos") { "-dynamiclib" } else { "-shared" })
        .args(["-fPIC", "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(&include)
        .arg("epsilon.c")
        .arg("-o")
        .arg(&lib);
    let status = cmd.status().expect("running the C compiler");
    assert!(status.success(), "compiling epsilon.c failed");
    println!("cargo:rustc-env=MLXD_EPSILON_LIB={}", lib.display());
    println!("cargo:rerun-if-changed=epsilon.c");
    println!("cargo:rerun-if-changed=../../plugin-api/include/mlxd_sampler.h");
}
