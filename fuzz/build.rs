//! Run path to the libmlx that mlx-sys linked (the daemon's build script does the same for its
//! binaries): the harnesses never call MLX, but the mlxd library links it.
fn main() {
    if let Ok(libdir) = std::env::var("DEP_MLX_LIBDIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
    }
}
