//! What MLX this process runs on: version, backend, device, memory, BLAS and library path.
//!
//! `mlxd doctor` prints [`Report::gather`]; the daemon's status message reuses it. mlx-rs does not
//! wrap these queries, so this file talks to mlx-c directly; every call is checked and a failure
//! becomes a field that says so rather than an abort.

use std::ffi::{CStr, CString};
use std::fmt::Write as _;

pub use crate::cuda_emulator::launches as emulated_kernel_launches;
pub use crate::ffi::{emulate_cuda_kernels, record_cuda_kernels, recorded_cuda_kernels};

/// MLX's CUDA backend keeps instantiated CUDA graphs in an LRU cache (400 by default,
/// `MLX_CUDA_GRAPH_CACHE_SIZE`) and counts every miss for the life of the process; past twice
/// the capacity it throws "Cache thrashing is happening" from whatever evaluation comes next
/// (`mlx/backend/cuda/lru_cache.h`, MLX 0.32). Misses only ever add up: each new prompt length,
/// batch size or model shape is one, so a daemon serving for days would get there, and on an H200
/// in session 19 a benchmark process reached it on its third model. An evicted graph is only
/// instantiated again, so the check is turned off (`MLX_ENABLE_CACHE_THRASHING_CHECK=0`) unless
/// the environment sets it. The binaries call this first, before MLX reads its environment and
/// before any other thread exists.
pub fn prepare_mlx_environment() {
    const CHECK: &str = "MLX_ENABLE_CACHE_THRASHING_CHECK";
    if std::env::var_os(CHECK).is_none() {
        std::env::set_var(CHECK, "0");
    }
}

/// A snapshot of the MLX runtime this process loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// MLX version reported by the loaded library.
    pub mlx_version: String,
    /// MLX version the bindings were built for.
    pub built_for: &'static str,
    /// `cuda`, `metal` or `cpu`: the best backend the loaded library can use.
    pub backend: &'static str,
    /// MLX's default device, e.g. `Device(gpu, 0)`.
    pub default_device: String,
    /// The device's name where the backend reports one (GPU model, CPU architecture).
    pub device_name: Option<String>,
    /// Total device memory in bytes where the backend reports it.
    pub device_memory: Option<u64>,
    /// MLX's memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// Bytes held by live arrays.
    pub active_memory: Option<u64>,
    /// Bytes held in MLX's buffer cache.
    pub cache_memory: Option<u64>,
    /// The BLAS library mapped into this process, if any.
    pub blas: String,
    /// Path of the `libmlx` mapped into this process.
    pub libmlx: String,
    /// Where the build provisioned libmlx, and which BLAS it wired.
    pub build_lib_dir: &'static str,
    /// Measured f32 matmul throughput (1024^3) on the default device, when asked for.
    pub matmul_gflops: Option<f64>,
}

impl Report {
    /// Queries the loaded MLX library.
    pub fn gather() -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let info = device_info();
        Report {
            mlx_version: mlx_version().unwrap_or_else(|| "unknown".into()),
            built_for: mlx_sys::build_info::MLX_VERSION,
            backend: backend(),
            default_device: default_device().unwrap_or_else(|| "unknown".into()),
            device_name: info.name,
            device_memory: info.memory,
            memory_limit: size_query(mlx_sys::mlx_get_memory_limit),
            active_memory: size_query(mlx_sys::mlx_get_active_memory),
            cache_memory: size_query(mlx_sys::mlx_get_cache_memory),
            blas: mapped_blas(&maps),
            libmlx: mapped(&maps, |name| name.starts_with("libmlx."))
                .unwrap_or_else(|| "not mapped (statically linked?)".into()),
            build_lib_dir: mlx_sys::build_info::MLX_LIB_DIR,
            matmul_gflops: None,
        }
    }

    /// Adds a short matmul measurement: it tells at a glance whether the CPU path runs on an
    /// optimized BLAS and whether the GPU is really used.
    pub fn with_matmul_benchmark(mut self) -> Self {
        self.matmul_gflops = matmul_gflops(1024).ok();
        self
    }

    /// True when the loaded MLX is the version the bindings were written for.
    pub fn version_matches(&self) -> bool {
        self.mlx_version == self.built_for
    }

    /// The human-readable form `mlxd doctor` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let gib = |b: Option<u64>| match b {
            Some(b) => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
            None => "unknown".into(),
        };
        let _ = writeln!(s, "mlxd {}", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(s, "  MLX version     {} (built for {})", self.mlx_version, self.built_for);
        let _ = writeln!(s, "  backend         {}", self.backend);
        let _ = writeln!(s, "  default device  {}", self.default_device);
        if let Some(name) = &self.device_name {
            let _ = writeln!(s, "  device name     {name}");
        }
        if self.device_memory.is_some() {
            let _ = writeln!(s, "  device memory   {}", gib(self.device_memory));
        }
        let _ = writeln!(s, "  memory limit    {}", gib(self.memory_limit));
        let _ = writeln!(s, "  active / cache  {} / {}", gib(self.active_memory), gib(self.cache_memory));
        let _ = writeln!(s, "  BLAS            {}", self.blas);
        if let Some(g) = self.matmul_gflops {
            let _ = writeln!(s, "  matmul 1024^3   {g:.1} GFLOP/s (f32, default device)");
        }
        let _ = writeln!(s, "  libmlx          {}", self.libmlx);
        let _ =
            writeln!(s, "  provisioned in  {} (BLAS at build: {})", self.build_lib_dir, mlx_sys::build_info::MLX_BLAS);
        if !self.version_matches() {
            let _ = writeln!(
                s,
                "\nwarning: the loaded MLX is {}, but mlxd was built for {}. Unset LD_LIBRARY_PATH \
                 or point it at an MLX {} library (e.g. the mlx-cuda-13=={} wheel's mlx/lib).",
                self.mlx_version, self.built_for, self.built_for, self.built_for
            );
        }
        if self.backend == "cpu" && self.blas.starts_with("reference") {
            let _ = writeln!(
                s,
                "\nnote: CPU matmuls use the wheel's reference BLAS (about 40x slower than OpenBLAS). \
                 Install OpenBLAS (Debian: apt-get install libopenblas0) and rebuild."
            );
        }
        s
    }
}

/// Median of five timed f32 `n x n` matmuls after one warm-up.
fn matmul_gflops(n: i32) -> Result<f64, mlx_rs::error::Exception> {
    let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
    let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
    mlx_rs::transforms::eval([&a, &b])?;
    let mut times = Vec::new();
    for i in 0..6 {
        let t = std::time::Instant::now();
        let c = mlx_rs::ops::matmul(&a, &b)?;
        c.eval()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * f64::from(n).powi(3) / times[times.len() / 2] / 1e9)
}

fn mlx_version() -> Option<String> {
    // SAFETY: mlx_string is created, filled and freed here; the data pointer is copied first.
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        let ok = mlx_sys::mlx_version(&mut s) == 0;
        let out = ok.then(|| cstr(mlx_sys::mlx_string_data(s))).flatten();
        mlx_sys::mlx_string_free(s);
        out
    }
}

pub(crate) fn backend() -> &'static str {
    let mut cuda = false;
    let mut metal = false;
    // SAFETY: both write a bool through a valid pointer.
    unsafe {
        if mlx_sys::mlx_cuda_is_available(&mut cuda) != 0 {
            cuda = false;
        }
        if mlx_sys::mlx_metal_is_available(&mut metal) != 0 {
            metal = false;
        }
    }
    match (cuda, metal) {
        (true, _) => "cuda",
        (_, true) => "metal",
        _ => "cpu",
    }
}

fn default_device() -> Option<String> {
    // SAFETY: device and string objects are created and freed here.
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        let mut s = mlx_sys::mlx_string_new();
        let ok = mlx_sys::mlx_get_default_device(&mut dev) == 0 && mlx_sys::mlx_device_tostring(&mut s, dev) == 0;
        let out = ok.then(|| cstr(mlx_sys::mlx_string_data(s))).flatten();
        mlx_sys::mlx_string_free(s);
        mlx_sys::mlx_device_free(dev);
        out
    }
}

#[derive(Default)]
struct DeviceInfo {
    name: Option<String>,
    memory: Option<u64>,
}

fn device_info() -> DeviceInfo {
    let mut out = DeviceInfo::default();
    // SAFETY: the info object is created, queried with NUL-terminated keys, and freed here;
    // returned strings are copied before the free.
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        if mlx_sys::mlx_get_default_device(&mut dev) != 0 {
            mlx_sys::mlx_device_free(dev);
            return out;
        }
        let mut info = mlx_sys::mlx_device_info_new();
        if mlx_sys::mlx_device_info_get(&mut info, dev) == 0 {
            for key in ["device_name", "architecture"] {
                let k = CString::new(key).expect("static key");
                let mut v: *const std::os::raw::c_char = std::ptr::null();
                if out.name.is_none() && mlx_sys::mlx_device_info_get_string(&mut v, info, k.as_ptr()) == 0 {
                    out.name = cstr(v);
                }
            }
            for key in ["total_memory", "memory_size"] {
                let k = CString::new(key).expect("static key");
                let mut v = 0usize;
                if out.memory.is_none() && mlx_sys::mlx_device_info_get_size(&mut v, info, k.as_ptr()) == 0 {
                    out.memory = Some(v as u64);
                }
            }
        }
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(dev);
    }
    out
}

fn size_query(f: unsafe extern "C" fn(*mut usize) -> std::os::raw::c_int) -> Option<u64> {
    let mut v = 0usize;
    // SAFETY: the query writes one size_t through a valid pointer.
    (unsafe { f(&mut v) } == 0).then_some(v as u64)
}

fn cstr(p: *const std::os::raw::c_char) -> Option<String> {
    // SAFETY: callers pass NUL-terminated strings owned by live MLX objects, or null.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The first file mapped into this process whose name passes `pred`, with links resolved.
fn mapped(maps: &str, pred: impl Fn(&str) -> bool) -> Option<String> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|path| path.rsplit('/').next().is_some_and(&pred))
        .map(|p| std::fs::canonicalize(p).map(|c| c.display().to_string()).unwrap_or(p.into()))
}

/// Which BLAS the process actually mapped: the wheel's links may point at OpenBLAS.
fn mapped_blas(maps: &str) -> String {
    if let Some(p) = mapped(maps, |n| n.starts_with("libopenblas")) {
        return format!("OpenBLAS ({p})");
    }
    if let Some(p) = mapped(maps, |n| n.starts_with("libblas")) {
        return format!("reference BLAS ({p})");
    }
    if cfg!(target_os = "macos") {
        return "Accelerate (linked by libmlx)".into();
    }
    "none mapped".into()
}

/// The primitives of the graph that computes `out`, counted by kind (MLX's own graph printer,
/// through a temporary file): what one step costs the host to build and launch, since on a GPU
/// every primitive does. For benchmarks and the `MLXD_STEP_GRAPH` log line, not the serving path.
pub fn graph_kinds(out: &mlx_rs::Array) -> std::io::Result<std::collections::BTreeMap<String, usize>> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("mlxd-step-graph-{}-{n}.txt", std::process::id()));
    let c_path = CString::new(path.to_string_lossy().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: plain C stdio on a file this function owns; the vector and namer are freed after use.
    unsafe {
        let f = libc::fopen(c_path.as_ptr(), c"w".as_ptr());
        if f.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        let v = mlx_sys::mlx_vector_array_new_value(out.as_ptr());
        let namer = mlx_sys::mlx_node_namer_new();
        mlx_sys::mlx_print_graph(f as *mut _, namer, v);
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(v);
        libc::fclose(f);
    }
    let text = std::fs::read_to_string(&path);
    let _ = std::fs::remove_file(&path);
    let mut kinds = std::collections::BTreeMap::new();
    for line in text?.lines() {
        if let Some(kind) =
            line.split_whitespace().next().filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        {
            *kinds.entry(kind.to_string()).or_default() += 1;
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_graph_cache_check_is_off_unless_the_environment_says_otherwise() {
        const CHECK: &str = "MLX_ENABLE_CACHE_THRASHING_CHECK";
        std::env::remove_var(CHECK);
        super::prepare_mlx_environment();
        assert_eq!(std::env::var(CHECK).as_deref(), Ok("0"), "off by default");
        std::env::set_var(CHECK, "1");
        super::prepare_mlx_environment();
        assert_eq!(std::env::var(CHECK).as_deref(), Ok("1"), "an explicit setting is kept");
        std::env::remove_var(CHECK);
    }
}
