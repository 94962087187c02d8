//! Calls into mlx-c for operations mlx-rs does not wrap (or wraps with extra nodes).

use mlx_rs::Array;
use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Runs one mlx-c operation that writes its result array into `res`, on this thread's default
/// stream. Returns the array, or `None` (the result freed) when mlx-c reports a failure; callers
/// turn that into an error naming what they asked for.
pub(crate) fn array_op(op: impl FnOnce(*mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> c_int) -> Option<Array> {
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

    /// On, and MLX runs on CUDA.
    pub(crate) fn available(&self) -> bool {
        static CUDA: OnceLock<bool> = OnceLock::new();
        self.flag().load(Ordering::Relaxed) && *CUDA.get_or_init(|| crate::runtime::backend() == "cuda")
    }
}

/// A template argument of a [`CudaKernel`] (becomes a `constexpr` or a type alias in its body).
#[derive(Debug, Clone, Copy)]
pub(crate) enum TemplateArg {
    Int(i32),
    Bool(bool),
    Dtype(mlx_rs::Dtype),
}

/// A CUDA kernel body compiled by MLX at first use (NVRTC) and run as one node of the step's
/// graph (`mlx_fast_cuda_kernel`); only on MLX's CUDA backend. MLX wraps `source` into a
/// function whose parameters are the inputs (`const T* name`, plus `name_shape` when the body
/// mentions it) and the outputs (`T* name`), and compiles one variant per set of template
/// arguments: callers keep those constant per model, never per step.
pub(crate) struct CudaKernel(mlx_sys::mlx_fast_cuda_kernel);

impl Drop for CudaKernel {
    fn drop(&mut self) {
        // SAFETY: created by mlx_fast_cuda_kernel_new, freed once.
        unsafe { mlx_sys::mlx_fast_cuda_kernel_free(self.0) };
    }
}

fn string_vector(names: &[&str]) -> mlx_sys::mlx_vector_string {
    let owned: Vec<std::ffi::CString> = names.iter().map(|n| std::ffi::CString::new(*n).expect("no NUL")).collect();
    let ptrs: Vec<*const std::os::raw::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    // SAFETY: the vector copies the strings, which outlive the call.
    unsafe { mlx_sys::mlx_vector_string_new_data(ptrs.as_ptr() as *mut _, ptrs.len()) }
}

impl CudaKernel {
    /// A kernel named `name` (plus its template arguments) with `header` (device functions)
    /// before the body. With `row_contiguous`, MLX copies any input that is not.
    pub(crate) fn new(
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        header: &str,
        source: &str,
        row_contiguous: bool,
    ) -> Self {
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
                0,
            );
            mlx_sys::mlx_vector_string_free(ins);
            mlx_sys::mlx_vector_string_free(outs);
            CudaKernel(k)
        }
    }

    /// Queues the kernel on this thread's stream: `grid` counts threads (not blocks) per axis,
    /// `block` threads per block. Returns one array per `(shape, dtype)` of `outputs`; `what`
    /// names the call in the error.
    pub(crate) fn apply(
        &self,
        inputs: &[&Array],
        outputs: &[(&[i32], mlx_rs::Dtype)],
        template: &[(&str, TemplateArg)],
        grid: (i32, i32, i32),
        block: (i32, i32, i32),
        what: impl FnOnce() -> String,
    ) -> Result<Vec<Array>, mlx_rs::error::Exception> {
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
                rc = mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs, self.0, ins, config, stream.as_ptr());
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
