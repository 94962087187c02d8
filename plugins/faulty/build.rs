//! Builds the C fixtures into shared libraries with the `cc` crate's compiler and publishes
//! their paths to `src/lib.rs`.
use std::path::{Path, PathBuf};

fn shared_library(out: &Path, name: &str, source: &str, defines: &[(&str, &str)]) -> PathBuf {
    let ext = if cfg!(target_os = "macos") { "dylib" } else { "so" };
    let lib = out.join(format!("lib{name}.{ext}"));
    let compiler = cc::Build::new().get_compiler();
    let mut cmd = compiler.to_command();
    cmd.arg(if cfg!(target_os = "macos") { "-dynamiclib" } else { "-shared" })
        .args(["-fPIC", "-O2", "-std=c99", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"))
                .join("../../plugin-api/include"),
        );
    for (k, v) in defines {
        cmd.arg(format!("-D{k}={v}"));
    }
    cmd.arg(Path::new("c").join(source)).arg("-o").arg(&lib);
    let status = cmd.status().unwrap_or_else(|e| panic!("running the C compiler for {source}: {e}"));
    assert!(status.success(), "compiling {source} failed");
    println!("cargo:rerun-if-changed=c/{source}");
    lib
}

/// Environment variable, library name, source, `-D` definitions.
type Fixture = (&'static str, &'static str, &'static str, &'static [(&'static str, &'static str)]);

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let fixtures: [Fixture; 4] = [
        ("MLXD_FIXTURE_NO_ENTRY", "mlxd_fixture_no_entry", "no_entry.c", &[]),
        (
            "MLXD_FIXTURE_ABI_FUTURE_MINOR",
            "mlxd_fixture_abi_future",
            "abi_version.c",
            &[("FIXTURE_MAJOR", "1"), ("FIXTURE_MINOR", "99"), ("FIXTURE_NAME", "\"future-minor\"")],
        ),
        (
            "MLXD_FIXTURE_ABI_MAJOR_2",
            "mlxd_fixture_abi_major2",
            "abi_version.c",
            &[("FIXTURE_MAJOR", "2"), ("FIXTURE_MINOR", "0"), ("FIXTURE_NAME", "\"major-two\"")],
        ),
        ("MLXD_FIXTURE_ABI_1_0", "mlxd_fixture_abi_1_0", "abi_1_0.c", &[]),
    ];
    for (env, name, source, defines) in fixtures {
        let lib = shared_library(&out, name, source, defines);
        println!("cargo:rustc-env={env}={}", lib.display());
    }
    println!("cargo:rerun-if-changed=../../plugin-api/include/mlxd_sampler.h");
}
