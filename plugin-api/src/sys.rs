//! The C header `include/mlxd_sampler.h`, item for item, as `#[repr(C)]` Rust types. The header's
//! comments are the specification (ownership of every handle included); this module repeats
//! only what a Rust reader needs next to the types. A layout test at the bottom pins the sizes.

use std::ffi::{c_char, c_void};

/// `MLXD_SAMPLER_ABI_MAJOR`: a plugin of another major version is refused.
pub const ABI_MAJOR: u32 = 1;
/// `MLXD_SAMPLER_ABI_MINOR`: a plugin whose minor is above the host's is refused.
pub const ABI_MINOR: u32 = 1;
/// `MLXD_SAMPLER_ENTRY_SYMBOL`, NUL-terminated for `dlsym`.
pub const ENTRY_SYMBOL: &[u8] = b"mlxd_sampler_plugin_v1\0";

/// `mlxd_array`: an opaque handle; null means "none" or "failed".
pub type ArrayHandle = *mut c_void;

/// `mlxd_status`.
pub type Status = i32;
/// Success.
pub const OK: Status = 0;
/// Invalid parameters (create).
pub const ERR_PARAMS: Status = 1;
/// An input of a shape or dtype the plugin cannot handle.
pub const ERR_SHAPE: Status = 2;
/// A host operation failed.
pub const ERR_HOST: Status = 3;
/// Anything else.
pub const ERR_INTERNAL: Status = 4;
/// A panic caught at the boundary.
pub const ERR_PANIC: Status = 5;

/// `mlxd_kind`: apply returns logits.
pub const KIND_PROCESSOR: i32 = 1;
/// `mlxd_kind`: apply returns token ids.
pub const KIND_SAMPLER: i32 = 2;

/// `MLXD_CAP_HISTORY`: apply reads `Context::tokens`.
pub const CAP_HISTORY: u64 = 1 << 0;
/// `MLXD_CAP_RANDOM`: apply reads `Context::key`.
pub const CAP_RANDOM: u64 = 1 << 1;
/// `MLXD_CAP_MODEL_DTYPE`: a processor's apply takes the logits in the float dtype they arrive
/// in (the model's, e.g. bfloat16) instead of a float32 conversion.
pub const CAP_MODEL_DTYPE: u64 = 1 << 2;

/// `mlxd_host`: the operation table. Every function takes the host pointer first; see the
/// header for each one's contract.
#[repr(C)]
#[allow(missing_docs)]
pub struct Host {
    pub struct_size: usize,
    pub abi_major: u32,
    pub abi_minor: u32,
    pub host_data: *mut c_void,

    pub last_error: unsafe extern "C" fn(h: *const Host) -> *const c_char,
    pub release: unsafe extern "C" fn(h: *const Host, a: ArrayHandle),
    pub retain: unsafe extern "C" fn(h: *const Host, a: ArrayHandle) -> ArrayHandle,

    pub ndim: unsafe extern "C" fn(h: *const Host, a: ArrayHandle) -> i32,
    pub dim: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32) -> i32,
    pub dtype: unsafe extern "C" fn(h: *const Host, a: ArrayHandle) -> i32,
    pub size: unsafe extern "C" fn(h: *const Host, a: ArrayHandle) -> i64,

    pub from_data: unsafe extern "C" fn(h: *const Host, data: *const c_void, shape: *const i32, ndim: i32, dtype: i32) -> ArrayHandle,
    pub scalar: unsafe extern "C" fn(h: *const Host, value: f64, dtype: i32) -> ArrayHandle,
    pub full: unsafe extern "C" fn(h: *const Host, shape: *const i32, ndim: i32, value: f64, dtype: i32) -> ArrayHandle,
    pub arange: unsafe extern "C" fn(h: *const Host, start: f64, stop: f64, step: f64, dtype: i32) -> ArrayHandle,

    pub unary: unsafe extern "C" fn(h: *const Host, op: i32, a: ArrayHandle) -> ArrayHandle,
    pub binary: unsafe extern "C" fn(h: *const Host, op: i32, a: ArrayHandle, b: ArrayHandle) -> ArrayHandle,
    pub r#where: unsafe extern "C" fn(h: *const Host, cond: ArrayHandle, a: ArrayHandle, b: ArrayHandle) -> ArrayHandle,
    pub astype: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, dtype: i32) -> ArrayHandle,

    pub reduce: unsafe extern "C" fn(h: *const Host, op: i32, a: ArrayHandle, axis: i32, keepdims: i32) -> ArrayHandle,
    pub softmax: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32) -> ArrayHandle,
    pub cumulative: unsafe extern "C" fn(h: *const Host, op: i32, a: ArrayHandle, axis: i32, reverse: i32, inclusive: i32) -> ArrayHandle,

    pub sort: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32) -> ArrayHandle,
    pub argsort: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32) -> ArrayHandle,
    pub argpartition: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, kth: i32, axis: i32) -> ArrayHandle,
    pub topk: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, k: i32, axis: i32) -> ArrayHandle,

    pub take: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, indices: ArrayHandle, axis: i32) -> ArrayHandle,
    pub take_along_axis: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, indices: ArrayHandle, axis: i32) -> ArrayHandle,
    pub put_along_axis: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, indices: ArrayHandle, values: ArrayHandle, axis: i32) -> ArrayHandle,
    pub scatter: unsafe extern "C" fn(h: *const Host, mode: i32, a: ArrayHandle, indices: ArrayHandle, updates: ArrayHandle, axis: i32) -> ArrayHandle,

    pub reshape: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, shape: *const i32, ndim: i32) -> ArrayHandle,
    pub slice: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32, start: i32, stop: i32, step: i32) -> ArrayHandle,
    pub concatenate: unsafe extern "C" fn(h: *const Host, arrays: *const ArrayHandle, n: i32, axis: i32) -> ArrayHandle,
    pub broadcast_to: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, shape: *const i32, ndim: i32) -> ArrayHandle,
    pub expand_dims: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32) -> ArrayHandle,
    pub squeeze: unsafe extern "C" fn(h: *const Host, a: ArrayHandle, axis: i32) -> ArrayHandle,

    pub random_split: unsafe extern "C" fn(h: *const Host, key: ArrayHandle, num: i32) -> ArrayHandle,
    pub random_uniform: unsafe extern "C" fn(h: *const Host, key: ArrayHandle, shape: *const i32, ndim: i32, dtype: i32) -> ArrayHandle,
    pub random_normal: unsafe extern "C" fn(h: *const Host, key: ArrayHandle, shape: *const i32, ndim: i32, dtype: i32) -> ArrayHandle,
    pub random_gumbel: unsafe extern "C" fn(h: *const Host, key: ArrayHandle, shape: *const i32, ndim: i32, dtype: i32) -> ArrayHandle,
    pub random_categorical: unsafe extern "C" fn(h: *const Host, key: ArrayHandle, logits: ArrayHandle, axis: i32) -> ArrayHandle,

    // 1.1
    pub kernel_language: unsafe extern "C" fn(h: *const Host) -> i32,
    pub kernel: unsafe extern "C" fn(h: *const Host, k: *const Kernel, launch: *const KernelLaunch, outputs: *mut ArrayHandle) -> i32,
}

/// Size of the operation table of ABI 1.0 (what a host of that version passes).
pub const HOST_SIZE_V1_0: usize = std::mem::offset_of!(Host, kernel_language);

/// `MLXD_KERNEL_NONE`: this host compiles no kernels.
pub const KERNEL_NONE: i32 = 0;
/// `MLXD_KERNEL_CUDA`: kernels are CUDA bodies.
pub const KERNEL_CUDA: i32 = 1;

/// `mlxd_kernel` (1.1): a kernel's name, code and parameter names, in static storage.
#[repr(C)]
pub struct Kernel {
    /// `sizeof(mlxd_kernel)` as the plugin built it.
    pub struct_size: usize,
    /// 1-64 of `[A-Za-z0-9_]`, NUL-terminated.
    pub name: *const c_char,
    /// Device code before the kernel, or null.
    pub header: *const c_char,
    /// The kernel's body.
    pub source: *const c_char,
    /// 1-16.
    pub n_inputs: i32,
    /// `n_inputs` identifiers.
    pub input_names: *const *const c_char,
    /// 1-8.
    pub n_outputs: i32,
    /// `n_outputs` identifiers.
    pub output_names: *const *const c_char,
}

/// `mlxd_kernel_launch` (1.1): one call's arrays, output shapes and launch geometry.
#[repr(C)]
pub struct KernelLaunch {
    /// `sizeof(mlxd_kernel_launch)` as the plugin built it.
    pub struct_size: usize,
    /// `n_inputs` borrowed handles.
    pub inputs: *const ArrayHandle,
    /// Every output's dimensions, one after another.
    pub output_shapes: *const i32,
    /// Each output's number of dimensions.
    pub output_ndims: *const i32,
    /// Each output's `mlxd_dtype`.
    pub output_dtypes: *const i32,
    /// Threads along x, y, z.
    pub grid: [i32; 3],
    /// Threads per block along x, y, z.
    pub block: [i32; 3],
}

/// `mlxd_error`: a host-owned message buffer.
#[repr(C)]
pub struct ErrorBuf {
    /// Where to write a NUL-terminated UTF-8 message.
    pub message: *mut c_char,
    /// Its size in bytes, including the NUL.
    pub capacity: usize,
}

/// `mlxd_create_args`.
#[repr(C)]
pub struct CreateArgs {
    /// `sizeof(mlxd_create_args)` as the host built it.
    pub struct_size: usize,
    /// The request's params as a JSON object, NUL-terminated.
    pub params_json: *const c_char,
    /// Its length without the NUL.
    pub params_len: usize,
    /// The model's vocabulary size.
    pub vocab_size: i32,
    /// Rows of every apply.
    pub batch: i32,
}

/// `mlxd_context`.
#[repr(C)]
pub struct Context {
    /// `sizeof(mlxd_context)` as the host built it.
    pub struct_size: usize,
    /// `[B, T]` int32 prompt + output, borrowed; null without `CAP_HISTORY`.
    pub tokens: ArrayHandle,
    /// Prompt length.
    pub prompt_tokens: i64,
    /// Tokens generated so far.
    pub generated_tokens: i64,
    /// `[2]` uint32 key, fresh every call, borrowed; null without `CAP_RANDOM`.
    pub key: ArrayHandle,
    /// The request's temperature.
    pub temperature: f32,
    /// The vocabulary size.
    pub vocab_size: i32,
}

/// `create` in the vtable.
pub type CreateFn = unsafe extern "C" fn(host: *const Host, args: *const CreateArgs, state: *mut *mut c_void, err: *mut ErrorBuf) -> Status;
/// `apply` in the vtable.
pub type ApplyFn = unsafe extern "C" fn(
    state: *mut c_void,
    host: *const Host,
    logits: ArrayHandle,
    ctx: *const Context,
    out: *mut ArrayHandle,
    err: *mut ErrorBuf,
) -> Status;
/// `accept` in the vtable.
pub type AcceptFn = unsafe extern "C" fn(state: *mut c_void, host: *const Host, token: ArrayHandle, err: *mut ErrorBuf) -> Status;
/// `destroy` in the vtable.
pub type DestroyFn = unsafe extern "C" fn(state: *mut c_void, host: *const Host);

/// `mlxd_sampler_vtable`. `create` and `apply` are required; `None` is C's NULL.
#[repr(C)]
pub struct VTable {
    /// `sizeof(mlxd_sampler_vtable)` as the plugin built it.
    pub struct_size: usize,
    /// Required.
    pub create: Option<CreateFn>,
    /// Required.
    pub apply: Option<ApplyFn>,
    /// Optional.
    pub accept: Option<AcceptFn>,
    /// Optional.
    pub destroy: Option<DestroyFn>,
}

/// `mlxd_plugin_descriptor`.
#[repr(C)]
pub struct Descriptor {
    /// `sizeof(mlxd_plugin_descriptor)` as the plugin built it.
    pub struct_size: usize,
    /// ABI major the plugin was built against.
    pub abi_major: u32,
    /// ABI minor the plugin was built against.
    pub abi_minor: u32,
    /// NUL-terminated name.
    pub name: *const c_char,
    /// NUL-terminated version.
    pub version: *const c_char,
    /// `KIND_PROCESSOR` or `KIND_SAMPLER`.
    pub kind: i32,
    /// `CAP_*` flags.
    pub capabilities: u64,
    /// NUL-terminated JSON Schema, or null.
    pub params_schema: *const c_char,
    /// NUL-terminated one-line description, or null.
    pub description: *const c_char,
    /// The entry points.
    pub vtable: *const VTable,
}

/// The entry function's type.
pub type EntryFn = unsafe extern "C" fn() -> *const Descriptor;

/// A descriptor in a `static` (raw pointers are not `Sync`; this one points at static data).
#[repr(transparent)]
pub struct StaticDescriptor(pub Descriptor);
// SAFETY: a descriptor built by `export_plugin!` points only at immutable static data.
unsafe impl Sync for StaticDescriptor {}

/// A vtable in a `static`.
#[repr(transparent)]
pub struct StaticVTable(pub VTable);
// SAFETY: function pointers only.
unsafe impl Sync for StaticVTable {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes a C compiler gives the header's structs on LP64 targets; a change here is an
    /// ABI change (append fields and bump the minor instead).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn struct_sizes_match_the_header() {
        assert_eq!(std::mem::size_of::<Host>(), 24 + 39 * 8);
        assert_eq!(HOST_SIZE_V1_0, 24 + 37 * 8);
        assert_eq!(std::mem::size_of::<Kernel>(), 64);
        assert_eq!(std::mem::size_of::<KernelLaunch>(), 64);
        assert_eq!(std::mem::size_of::<ErrorBuf>(), 16);
        assert_eq!(std::mem::size_of::<CreateArgs>(), 32);
        assert_eq!(std::mem::size_of::<Context>(), 48);
        assert_eq!(std::mem::size_of::<VTable>(), 40);
        assert_eq!(std::mem::size_of::<Descriptor>(), 72);
    }
}
