//! Generates `bindings.rs` from mlx-c's public headers, shaped as mlx-rs 0.33 expects.
//!
//! mlx-rs reads `float16_t` as a one-field tuple struct over `u16` and `bfloat16_t` as a plain
//! `u16`: that is what bindgen produces for `__fp16` / `__bf16` on ARM. On other targets the
//! adapted `half.h` declares both as `uint16_t`, so both are block-listed and given the ARM shapes.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

/// Writes `$OUT_DIR/bindings.rs` for every `mlx/c/*.h` in `src`.
pub fn generate(src: &Path, out_dir: &Path) -> Result<(), String> {
    let header_dir = src.join("mlx/c");
    let mut headers: Vec<_> = fs::read_dir(&header_dir)
        .map_err(|e| format!("reading {}: {e}", header_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension() == Some(OsStr::new("h")))
        .collect();
    headers.sort();

    let mut builder = bindgen::Builder::default()
        .rust_target(bindgen::RustTarget::stable(73, 0).map_err(|e| e.to_string())?)
        .clang_arg(format!("-I{}", src.display()))
        // As upstream: bindgen's c_ulong sizes for these trip rustc's runtime-symbol lint.
        .blocklist_function("malloc")
        .blocklist_function("realloc");
    let arm = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "aarch64");
    if !arm {
        builder = builder
            .blocklist_type("float16_t")
            .blocklist_type("bfloat16_t")
            .raw_line("/// IEEE 754 half-precision bits, as bindgen renders ARM's `__fp16`.")
            .raw_line("#[repr(transparent)]")
            .raw_line("#[derive(Debug, Default, Copy, Clone, PartialEq, Eq, Hash)]")
            .raw_line("pub struct float16_t(pub u16);")
            .raw_line("/// bfloat16 bits, as bindgen renders ARM's `__bf16`.")
            .raw_line("pub type bfloat16_t = u16;");
    }
    for header in &headers {
        builder = builder.header(header.to_string_lossy());
    }
    let bindings = builder.generate().map_err(|e| format!("bindgen: {e}"))?;
    bindings
        .write_to_file(out_dir.join("bindings.rs"))
        .map_err(|e| format!("writing bindings.rs: {e}"))
}
