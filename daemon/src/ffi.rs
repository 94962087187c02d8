//! Calls into mlx-c for operations mlx-rs does not wrap (or wraps with extra nodes).

use mlx_rs::{Array, Dtype};
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// Makes sure mlx-rs's error handler is MLX's before calling mlx-c directly. mlx-rs installs it
/// at its first operation; until then mlx-c's default handler ends the process on any error,
/// so a direct call that fails first (a CUDA kernel made where MLX has no CUDA back-end) would
/// take the process down instead of returning an error.
pub(crate) fn ensure_error_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = mlx_rs::ops::zeros::<f32>(&[1]);
    });
}

/// Runs one mlx-c operation that writes its result array into `res`, on this thread's default
/// stream. Returns the array, or `None` (the result freed) when mlx-c reports a failure; callers
/// turn that into an error naming what they asked for.
pub(crate) fn array_op(op: impl FnOnce(*mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> c_int) -> Option<Array> {
    ensure_error_handler();
    let stream = mlx_rs::Stream::thread_local_or_default();
    // SAFETY: `res` is created here and either owned by the returned Array or freed; `op` only
    // writes an array into it (an untouched empty array is still a valid handle).
    unsafe {
        let mut res = mlx_sys::mlx_array_new();
        if op(&mut res, stream.as_ptr()) != 0 {
            mlx_sys::mlx_array_free(res);
            return None;
        }
        Some(Array::from_ptr(res))
    }
}

/// Whether a family of mlxd's CUDA kernels may run: on unless its environment variable is `0`
/// (or, for one made with [`KernelSwitch::off_by_default`], off unless it is set to something
/// else; read once), switchable for the whole process, and only where MLX runs on CUDA.
pub(crate) struct KernelSwitch {
    var: &'static str,
    default: bool,
    on: OnceLock<AtomicBool>,
}

impl KernelSwitch {
    pub(crate) const fn new(var: &'static str) -> Self {
        KernelSwitch { var, default: true, on: OnceLock::new() }
    }

    /// For kernels not yet the default: on only where `var` is set (and not `0`).
    pub(crate) const fn off_by_default(var: &'static str) -> Self {
        KernelSwitch { var, default: false, on: OnceLock::new() }
    }

    fn flag(&self) -> &AtomicBool {
        self.on.get_or_init(|| AtomicBool::new(std::env::var(self.var).map_or(self.default, |v| v != "0")))
    }

    pub(crate) fn set(&self, enabled: bool) {
        self.flag().store(enabled, Ordering::Relaxed);
    }

    /// On, and MLX runs on CUDA (or kernels are being recorded or emulated:
    /// [`record_cuda_kernels`], [`emulate_cuda_kernels`]).
    pub(crate) fn available(&self) -> bool {
        static CUDA: OnceLock<bool> = OnceLock::new();
        self.flag().load(Ordering::Relaxed)
            && (*CUDA.get_or_init(|| crate::runtime::backend() == "cuda") || off_device())
    }
}

/// A template argument of a [`CudaKernel`] (becomes a `constexpr` or a type alias in its body).
#[derive(Debug, Clone, Copy)]
pub(crate) enum TemplateArg {
    Int(i32),
    Bool(bool),
    Dtype(mlx_rs::Dtype),
}

/// Where [`record_cuda_kernels`] writes, and the files written so far.
struct Recording {
    dir: PathBuf,
    written: Mutex<std::collections::BTreeSet<String>>,
}

static RECORDING: OnceLock<Recording> = OnceLock::new();

/// From now on, for the whole process, every CUDA kernel mlxd would queue is written to `dir`
/// instead (one JSON file per distinct compile: name, header, body, each parameter's dtype, the
/// template arguments) and its outputs are zeros of the asked shapes. The kernel paths are taken
/// on any backend, so a machine without a GPU walks the same call sites as one with it and hands
/// the exact sources MLX would compile to an NVRTC check (`tests/nvrtc/check.py`). For that
/// check only: a model's outputs are meaningless while recording. Call before any kernel is made.
pub fn record_cuda_kernels(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let recording = Recording { dir: dir.to_path_buf(), written: Mutex::new(Default::default()) };
    RECORDING.set(recording).map_err(|_| std::io::Error::other("kernels are already being recorded"))
}

static EMULATING: AtomicBool = AtomicBool::new(false);

pub(crate) fn emulating() -> bool {
    EMULATING.load(Ordering::Relaxed)
}

/// From now on, for the whole process, every CUDA kernel mlxd would queue runs on the CPU
/// instead, in `crate::cuda_emulator` (compiled by the system's C++ compiler, evaluated at once),
/// and the kernel paths are taken on any backend: for tests that compare the kernels with MLX
/// operations where no GPU is. Call before any kernel is made.
pub fn emulate_cuda_kernels() {
    EMULATING.store(true, Ordering::Relaxed);
}

/// Kernels are recorded or emulated: none reaches MLX, and the kernel paths are taken on any
/// backend.
pub(crate) fn off_device() -> bool {
    RECORDING.get().is_some() || emulating()
}

/// The names of the kernel files recorded so far (`NAME-HASH.json`).
pub fn recorded_cuda_kernels() -> Vec<String> {
    RECORDING
        .get()
        .map_or_else(Vec::new, |r| r.written.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect())
}

/// MLX's name of a dtype (`mlx.core.bfloat16`'s `bfloat16`).
fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Bool => "bool",
        Dtype::Uint8 => "uint8",
        Dtype::Uint16 => "uint16",
        Dtype::Uint32 => "uint32",
        Dtype::Uint64 => "uint64",
        Dtype::Int8 => "int8",
        Dtype::Int16 => "int16",
        Dtype::Int32 => "int32",
        Dtype::Int64 => "int64",
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Float32 => "float32",
        Dtype::Float64 => "float64",
        Dtype::Complex64 => "complex64",
    }
}

/// What MLX is given to compile a kernel, kept for [`record_cuda_kernels`] and
/// [`emulate_cuda_kernels`].
pub(crate) struct KernelSource {
    pub(crate) name: String,
    pub(crate) inputs: Vec<String>,
    pub(crate) outputs: Vec<String>,
    pub(crate) header: String,
    pub(crate) source: String,
}

/// A CUDA kernel body compiled by MLX at first use (NVRTC) and run as one node of the step's
/// graph (`mlx_fast_cuda_kernel`); only on MLX's CUDA backend. MLX wraps `source` into a
/// function whose parameters are the inputs (`const T* name`, plus `name_shape` when the body
/// mentions it) and the outputs (`T* name`), and compiles one variant per set of template
/// arguments: callers keep those constant per model, never per step.
pub(crate) struct CudaKernel {
    /// `None` while recording or emulating (nothing is handed to MLX).
    handle: Option<mlx_sys::mlx_fast_cuda_kernel>,
    spec: KernelSource,
}

impl Drop for CudaKernel {
    fn drop(&mut self) {
        if let Some(handle) = self.handle {
            // SAFETY: created by mlx_fast_cuda_kernel_new, freed once.
            unsafe { mlx_sys::mlx_fast_cuda_kernel_free(handle) };
        }
    }
}

/// `source` without blank lines, lines that are only a `//` comment, and leading whitespace.
/// MLX 0.32 hashes a custom kernel's whole source text each time it queues the kernel (to name
/// its compiled module), so the text's length is host time at every decode step; comments and
/// indentation were 38% of the sampling kernels' text.
pub(crate) fn compact_source(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines().map(str::trim_start) {
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn string_vector(names: &[&str]) -> mlx_sys::mlx_vector_string {
    let owned: Vec<std::ffi::CString> = names.iter().map(|n| std::ffi::CString::new(*n).expect("no NUL")).collect();
    let ptrs: Vec<*const std::os::raw::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    // SAFETY: the vector copies the strings, which outlive the call.
    unsafe { mlx_sys::mlx_vector_string_new_data(ptrs.as_ptr() as *mut _, ptrs.len()) }
}

impl CudaKernel {
    /// A kernel named `name` (plus its template arguments) with `header` (device functions)
    /// before the body. With `row_contiguous`, MLX copies any input that is not. Header and
    /// body go to MLX without their comment lines and indentation ([`compact_source`]).
    pub(crate) fn new(
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        header: &str,
        source: &str,
        row_contiguous: bool,
    ) -> Self {
        Self::with_dynamic_shared(name, inputs, outputs, header, source, row_contiguous, 0)
    }

    /// As [`CudaKernel::new`], for a kernel that declares `bytes` of dynamic shared memory
    /// (`extern __shared__`; MLX raises the kernel's limit past 48 KB where asked).
    pub(crate) fn with_dynamic_shared(
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        header: &str,
        source: &str,
        row_contiguous: bool,
        bytes: i32,
    ) -> Self {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let spec = KernelSource {
            name: name.to_string(),
            inputs: owned(inputs),
            outputs: owned(outputs),
            header: compact_source(header),
            source: compact_source(source),
        };
        let (header, source) = (spec.header.as_str(), spec.source.as_str());
        if off_device() {
            return CudaKernel { handle: None, spec };
        }
        ensure_error_handler();
        let (ins, outs) = (string_vector(inputs), string_vector(outputs));
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (name, header, source) = (c(name), c(header), c(source));
        // SAFETY: mlx-c copies names, source and header; the string vectors are freed after.
        unsafe {
            let k = mlx_sys::mlx_fast_cuda_kernel_new(
                name.as_ptr(),
                ins,
                outs,
                source.as_ptr(),
                header.as_ptr(),
                row_contiguous,
                bytes,
            );
            mlx_sys::mlx_vector_string_free(ins);
            mlx_sys::mlx_vector_string_free(outs);
            CudaKernel { handle: Some(k), spec }
        }
    }

    /// A kernel MLX never sees (unit tests of code that keeps kernels, on the CPU).
    #[cfg(test)]
    pub(crate) fn inert(name: &str) -> Self {
        let spec = KernelSource {
            name: name.to_string(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            header: String::new(),
            source: String::new(),
        };
        CudaKernel { handle: None, spec }
    }

    /// Writes this call's compile (not its shapes, which MLX passes at run time) to the
    /// recording folder once, and returns zeros in place of the outputs.
    fn record(
        &self,
        inputs: &[&Array],
        outputs: &[(&[i32], Dtype)],
        template: &[(&str, TemplateArg)],
        what: impl FnOnce() -> String,
    ) -> Result<Vec<Array>, mlx_rs::error::Exception> {
        let recording = RECORDING.get().expect("recording");
        let spec = &self.spec;
        let template: Vec<serde_json::Value> = template
            .iter()
            .map(|(name, arg)| match arg {
                TemplateArg::Int(v) => serde_json::json!([name, v]),
                TemplateArg::Bool(v) => serde_json::json!([name, v]),
                TemplateArg::Dtype(d) => serde_json::json!([name, {"dtype": dtype_name(*d)}]),
            })
            .collect();
        let json = serde_json::json!({
            "name": spec.name,
            "header": spec.header,
            "source": spec.source,
            "inputs": spec.inputs.iter().zip(inputs)
                .map(|(n, a)| serde_json::json!([n, dtype_name(a.dtype()), a.ndim()])).collect::<Vec<_>>(),
            "outputs": spec.outputs.iter().zip(outputs)
                .map(|(n, (_, d))| serde_json::json!([n, dtype_name(*d)])).collect::<Vec<_>>(),
            "template": template,
        })
        .to_string();
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        json.hash(&mut h);
        let file = format!("{}-{:016x}.json", spec.name, h.finish());
        let mut written = recording.written.lock().unwrap_or_else(|e| e.into_inner());
        if !written.contains(&file) {
            std::fs::write(recording.dir.join(&file), &json)
                .map_err(|e| mlx_rs::error::Exception::custom(format!("recording {}: {e}", what())))?;
            written.insert(file);
        }
        outputs.iter().map(|(shape, d)| mlx_rs::ops::zeros_dtype(shape, *d)).collect()
    }

    /// Queues the kernel on this thread's stream: `grid` counts threads (not blocks) per axis,
    /// `block` threads per block. Returns one array per `(shape, dtype)` of `outputs`; `what`
    /// names the call in the error.
    pub(crate) fn apply(
        &self,
        inputs: &[&Array],
        outputs: &[(&[i32], Dtype)],
        template: &[(&str, TemplateArg)],
        grid: (i32, i32, i32),
        block: (i32, i32, i32),
        what: impl FnOnce() -> String,
    ) -> Result<Vec<Array>, mlx_rs::error::Exception> {
        let Some(handle) = self.handle else {
            if emulating() {
                return crate::cuda_emulator::run(&self.spec, inputs, outputs, template, grid, block);
            }
            return self.record(inputs, outputs, template, what);
        };
        let stream = mlx_rs::Stream::thread_local_or_default();
        let dtype = |d: mlx_rs::Dtype| d as mlx_sys::mlx_dtype;
        // SAFETY: mlx-c calls on handles that outlive them; every handle created is freed.
        unsafe {
            let config = mlx_sys::mlx_fast_cuda_kernel_config_new();
            let mut rc = 0;
            for (shape, d) in outputs {
                rc |=
                    mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(config, shape.as_ptr(), shape.len(), dtype(*d));
            }
            for (name, arg) in template {
                let n = std::ffi::CString::new(*name).expect("no NUL");
                rc |= match arg {
                    TemplateArg::Int(v) => {
                        mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_int(config, n.as_ptr(), *v)
                    }
                    TemplateArg::Bool(v) => {
                        mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_bool(config, n.as_ptr(), *v)
                    }
                    TemplateArg::Dtype(d) => {
                        mlx_sys::mlx_fast_cuda_kernel_config_add_template_arg_dtype(config, n.as_ptr(), dtype(*d))
                    }
                };
            }
            rc |= mlx_sys::mlx_fast_cuda_kernel_config_set_grid(config, grid.0, grid.1, grid.2);
            rc |= mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(config, block.0, block.1, block.2);
            let handles: Vec<mlx_sys::mlx_array> = inputs.iter().map(|a| a.as_ptr()).collect();
            let ins = mlx_sys::mlx_vector_array_new_data(handles.as_ptr(), handles.len());
            let mut outs = mlx_sys::mlx_vector_array_new();
            if rc == 0 {
                rc = mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs, handle, ins, config, stream.as_ptr());
            }
            let mut result = Vec::with_capacity(outputs.len());
            for i in 0..outputs.len() {
                if rc != 0 {
                    break;
                }
                let mut a = mlx_sys::mlx_array_new();
                rc = mlx_sys::mlx_vector_array_get(&mut a, outs, i);
                if rc == 0 {
                    result.push(Array::from_ptr(a));
                } else {
                    mlx_sys::mlx_array_free(a);
                }
            }
            mlx_sys::mlx_vector_array_free(ins);
            mlx_sys::mlx_vector_array_free(outs);
            mlx_sys::mlx_fast_cuda_kernel_config_free(config);
            if rc != 0 {
                return Err(mlx_rs::error::Exception::custom(format!("CUDA kernel failed: {}", what())));
            }
            Ok(result)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compact_source;

    #[test]
    fn compacted_kernel_source_keeps_every_code_line() {
        let source = "    // what it does\n\n    const int i = threadIdx.x;  // a thread\n        if (i < n) {\n\t// inner\n            y[i] = x[i];\n        }\n";
        assert_eq!(compact_source(source), "const int i = threadIdx.x;  // a thread\nif (i < n) {\ny[i] = x[i];\n}\n");
        assert_eq!(compact_source(""), "");
    }
}
