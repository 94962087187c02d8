//! Raw bindings to mlx-c, generated at build time by `build/main.rs`.
//!
//! This crate stands in for crates.io's `mlx-sys` 0.7.0 (through `[patch.crates-io]` in the
//! workspace manifest) so that mlx-rs builds on Linux (CPU and CUDA) as well as on macOS. The
//! build script documents where MLX and mlx-c come from; this file only exposes the result.
#![allow(non_upper_case_globals)]
#![allow(non_camel_case_types)]
#![allow(non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// Where the build script found or provisioned MLX, for diagnostics (`mlxd doctor`).
pub mod build_info {
    /// The MLX version the bindings were built for.
    pub const MLX_VERSION: &str = env!("MLXD_MLX_VERSION");
    /// The backend whose wheel was provisioned: `cpu`, `cuda` or `metal` (or `custom`).
    pub const MLX_BACKEND: &str = env!("MLXD_MLX_BACKEND");
    /// The directory holding the `libmlx` the binary was linked against.
    pub const MLX_LIB_DIR: &str = env!("MLXD_MLX_LIB_DIR");
    /// The BLAS the provisioned CPU library was wired to at build time.
    pub const MLX_BLAS: &str = env!("MLXD_MLX_BLAS");
}

/// mlx-rs seeds its default random state with Apple's `mach_approximate_time`. Other systems
/// lack it, so this provides a monotonic nanosecond clock under the same name.
#[cfg(not(target_vendor = "apple"))]
#[no_mangle]
pub extern "C" fn mach_approximate_time() -> u64 {
    let mut ts = std::mem::MaybeUninit::<Timespec>::uninit();
    // SAFETY: clock_gettime writes a full timespec on success; CLOCK_MONOTONIC always exists.
    let rc = unsafe { clock_gettime(CLOCK_MONOTONIC, ts.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: initialised by the successful call above.
    let ts = unsafe { ts.assume_init() };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

#[cfg(not(target_vendor = "apple"))]
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

#[cfg(not(target_vendor = "apple"))]
const CLOCK_MONOTONIC: i32 = 1;

#[cfg(not(target_vendor = "apple"))]
extern "C" {
    fn clock_gettime(clock_id: i32, tp: *mut Timespec) -> i32;
}
