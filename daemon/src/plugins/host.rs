//! The host side of the operation table (`mlxd_host` in `mlxd_sampler.h`): every entry is an
//! `extern "C"` function over MLX arrays kept in a per-instance handle table.
//!
//! A handle is a slot number and a generation packed into the pointer, never a real pointer:
//! a stale or made-up handle is an error the plugin gets back, not a crash. Every operation
//! runs under `catch_unwind`, and MLX errors (mlx-rs returns them as `Result`) become NULL
//! plus a message, so nothing unwinds into plugin code. Operations work only while the host
//! is inside a call into this instance, on that thread ([`HostCtx::enter`]); nothing here
//! reads array data to the host. The operations themselves are in `ops`.

use super::kernels::{op_kernel, op_kernel_language, KernelKey};
use super::ops::*;
use crate::ffi::CudaKernel;
use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};
use mlxd_plugin_api::sys::{self, ArrayHandle};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CString;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

/// Largest array `from_data` copies from the plugin.
pub(super) const MAX_FROM_DATA: i64 = 1 << 24;
/// Most dimensions an array may have here.
const MAX_NDIM: i32 = 8;

thread_local! {
    /// The instance whose call is running on this thread (null outside calls).
    static CURRENT: Cell<*const HostCtx> = const { Cell::new(std::ptr::null()) };
}

#[derive(Default)]
struct Slab {
    slots: Vec<(u32, Option<Array>)>,
    free: Vec<usize>,
    live: usize,
}

/// One plugin instance's side of the host: its operation table, handles and last error.
/// `table` comes first so that the `*const sys::Host` the plugin holds is this struct.
#[repr(C)]
pub(crate) struct HostCtx {
    table: sys::Host,
    slab: RefCell<Slab>,
    pub(super) last_error: RefCell<CString>,
    /// `MLXD_KERNEL_*` this instance is offered, fixed at creation.
    pub(super) kernel_language: i32,
    /// The plugin's kernels by the addresses of their name, header and source (the header asks
    /// for static storage), each definition checked once (MLX keeps their compiled code).
    kernels: RefCell<HashMap<KernelKey, Rc<PluginKernel>>>,
}

/// Kernel definitions one plugin instance may make (see [`HostCtx::kernel`]).
pub(crate) const MAX_KERNELS: usize = 64;

/// One of a plugin's kernels: its checked definition, and the element types it is known to
/// compile for.
pub(super) struct PluginKernel {
    pub(super) name: String,
    /// Name, header and source: what makes two kernels the same code for the process-wide
    /// record of what compiled.
    pub(super) signature: String,
    pub(super) input_names: Vec<String>,
    pub(super) output_names: Vec<String>,
    pub(super) kernel: CudaKernel,
    /// Inputs' then outputs' dtypes of the calls that compiled (checked once per process, then
    /// remembered here so a step costs a lookup).
    pub(super) compiled: RefCell<Vec<Vec<Dtype>>>,
}

/// Why an operation returned NULL.
pub(super) enum OpError {
    /// A NULL argument: propagate without a new message.
    Null,
    /// Record this message.
    Failed(String),
}

impl From<Exception> for OpError {
    fn from(e: Exception) -> Self {
        OpError::Failed(e.what().to_string())
    }
}

pub(super) type Op<T> = Result<T, OpError>;

pub(super) fn fail<T>(message: impl Into<String>) -> Op<T> {
    Err(OpError::Failed(message.into()))
}

/// Restores the previous "current instance" when a call into the plugin returns.
pub(crate) struct Entered {
    previous: *const HostCtx,
}

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

impl HostCtx {
    /// A table with no handles. Boxed: plugins keep its address until `destroy`.
    pub(crate) fn new() -> Box<HostCtx> {
        Self::with_kernel_language(super::kernels::language())
    }

    /// A table offering kernels of `language` (`MLXD_KERNEL_*`).
    pub(super) fn with_kernel_language(kernel_language: i32) -> Box<HostCtx> {
        let table = sys::Host {
            struct_size: std::mem::size_of::<sys::Host>(),
            abi_major: sys::ABI_MAJOR,
            abi_minor: sys::ABI_MINOR,
            host_data: std::ptr::null_mut(),
            last_error: op_last_error,
            release: op_release,
            retain: op_retain,
            ndim: op_ndim,
            dim: op_dim,
            dtype: op_dtype,
            size: op_size,
            from_data: op_from_data,
            scalar: op_scalar,
            full: op_full,
            arange: op_arange,
            unary: op_unary,
            binary: op_binary,
            r#where: op_where,
            astype: op_astype,
            reduce: op_reduce,
            softmax: op_softmax,
            cumulative: op_cumulative,
            sort: op_sort,
            argsort: op_argsort,
            argpartition: op_argpartition,
            topk: op_topk,
            take: op_take,
            take_along_axis: op_take_along_axis,
            put_along_axis: op_put_along_axis,
            scatter: op_scatter,
            reshape: op_reshape,
            slice: op_slice,
            concatenate: op_concatenate,
            broadcast_to: op_broadcast_to,
            expand_dims: op_expand_dims,
            squeeze: op_squeeze,
            random_split: op_random_split,
            random_uniform: op_random_uniform,
            random_normal: op_random_normal,
            random_gumbel: op_random_gumbel,
            random_categorical: op_random_categorical,
            kernel_language: op_kernel_language,
            kernel: op_kernel,
        };
        Box::new(HostCtx {
            table,
            slab: RefCell::default(),
            last_error: RefCell::new(CString::default()),
            kernel_language,
            kernels: RefCell::default(),
        })
    }

    /// The pointer plugins receive.
    pub(crate) fn table(&self) -> *const sys::Host {
        &self.table
    }

    /// Marks this instance as the one being called on this thread, until the guard drops.
    pub(crate) fn enter(&self) -> Entered {
        let previous = CURRENT.with(|c| c.replace(self as *const HostCtx));
        Entered { previous }
    }

    /// Lends `a` to the plugin as a handle (the caller removes it after the call).
    pub(crate) fn insert(&self, a: Array) -> ArrayHandle {
        let mut s = self.slab.borrow_mut();
        s.live += 1;
        let index = match s.free.pop() {
            Some(i) => {
                let slot = &mut s.slots[i];
                slot.0 = slot.0.wrapping_add(1);
                slot.1 = Some(a);
                i
            }
            None => {
                s.slots.push((1, Some(a)));
                s.slots.len() - 1
            }
        };
        let generation = s.slots[index].0;
        (((generation as u64) << 32) | (index as u64 + 1)) as usize as ArrayHandle
    }

    fn locate(&self, h: ArrayHandle) -> Option<usize> {
        let raw = h as usize as u64;
        let index = (raw & 0xffff_ffff).checked_sub(1)? as usize;
        let generation = (raw >> 32) as u32;
        let s = self.slab.borrow();
        match s.slots.get(index) {
            Some((g, Some(_))) if *g == generation => Some(index),
            _ => None,
        }
    }

    /// The array behind a handle (a cheap reference-counted clone).
    pub(crate) fn get(&self, h: ArrayHandle) -> Option<Array> {
        let index = self.locate(h)?;
        self.slab.borrow().slots[index].1.clone()
    }

    /// Removes a handle, returning its array (None if it was not live).
    pub(crate) fn take(&self, h: ArrayHandle) -> Option<Array> {
        let index = self.locate(h)?;
        let mut s = self.slab.borrow_mut();
        let a = s.slots[index].1.take();
        s.free.push(index);
        s.live -= 1;
        a
    }

    /// Handles currently live.
    pub(crate) fn live_handles(&self) -> usize {
        self.slab.borrow().live
    }

    /// Drops every handle (after `destroy`, so leaks end with the sequence).
    pub(crate) fn clear(&self) {
        *self.slab.borrow_mut() = Slab::default();
    }

    /// The plugin's kernel whose name, header and source are where `key` says and whose
    /// parameter names `same` accepts, checked and made by `make` on first use (a definition
    /// that fails its check is not remembered). The parameter-name arrays may move between
    /// calls (the Rust helper builds them per call), so they are compared, not keyed on. At
    /// most [`MAX_KERNELS`] definitions per instance: a plugin that builds its strings anew
    /// for every call would otherwise define (and keep) a kernel per step.
    pub(super) fn kernel(
        &self,
        key: KernelKey,
        same: impl FnOnce(&PluginKernel) -> bool,
        make: impl FnOnce() -> Op<PluginKernel>,
    ) -> Op<Rc<PluginKernel>> {
        if let Some(k) = self.kernels.borrow().get(&key).filter(|k| same(k)) {
            return Ok(k.clone());
        }
        let mut kernels = self.kernels.borrow_mut();
        if kernels.len() >= MAX_KERNELS && !kernels.contains_key(&key) {
            return Err(OpError::Failed(format!(
                "more than {MAX_KERNELS} kernel definitions in one instance: keep each mlxd_kernel's name, header \
                 and source in static storage (new addresses are a new definition)"
            )));
        }
        let k = Rc::new(make()?);
        kernels.insert(key, k.clone());
        Ok(k)
    }

    /// Kernel definitions made so far (tests).
    #[cfg(test)]
    pub(super) fn kernel_count(&self) -> usize {
        self.kernels.borrow().len()
    }

    /// The last recorded error message.
    pub(crate) fn last_error(&self) -> String {
        self.last_error.borrow().to_string_lossy().into_owned()
    }

    pub(super) fn arg(&self, h: ArrayHandle) -> Op<Array> {
        if h.is_null() {
            return Err(OpError::Null);
        }
        self.get(h).ok_or_else(|| OpError::Failed(format!("invalid or released array handle {h:p}")))
    }

    pub(super) fn record(&self, message: String) {
        let message = message.replace('\0', " ");
        *self.last_error.borrow_mut() = CString::new(message).unwrap_or_default();
    }
}

/// The instance behind `h`, if it is the one being called on this thread.
pub(super) fn current(h: *const sys::Host) -> Option<&'static HostCtx> {
    let ctx = CURRENT.with(Cell::get);
    if ctx.is_null() || ctx as *const sys::Host != h {
        return None;
    }
    // SAFETY: set by `enter` from a live, boxed HostCtx for the duration of the call.
    Some(unsafe { &*ctx })
}

/// Runs an operation producing a value, recording errors; `on_error` when it fails.
pub(super) fn guarded<T>(h: *const sys::Host, on_error: T, f: impl FnOnce(&HostCtx) -> Op<T>) -> T {
    let Some(ctx) = current(h) else { return on_error };
    match catch_unwind(AssertUnwindSafe(|| f(ctx))) {
        Ok(Ok(v)) => v,
        Ok(Err(OpError::Null)) => on_error,
        Ok(Err(OpError::Failed(m))) => {
            ctx.record(m);
            on_error
        }
        Err(p) => {
            let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            ctx.record(format!("host operation panicked: {}", what.unwrap_or_default()));
            on_error
        }
    }
}

/// Runs an operation producing an array; the result becomes a new owned handle.
pub(super) fn array_op(h: *const sys::Host, what: &'static str, f: impl FnOnce(&HostCtx) -> Op<Array>) -> ArrayHandle {
    guarded(h, std::ptr::null_mut(), |ctx| match f(ctx) {
        Ok(a) => Ok(ctx.insert(a)),
        Err(OpError::Failed(m)) => Err(OpError::Failed(format!("{what}: {m}"))),
        Err(e) => Err(e),
    })
}

pub(super) fn dtype_of(code: i32) -> Op<Dtype> {
    Ok(match code {
        0 => Dtype::Bool,
        1 => Dtype::Uint8,
        2 => Dtype::Uint32,
        3 => Dtype::Uint64,
        4 => Dtype::Int32,
        5 => Dtype::Int64,
        6 => Dtype::Float16,
        7 => Dtype::Bfloat16,
        8 => Dtype::Float32,
        other => return fail(format!("unknown dtype code {other}")),
    })
}

pub(super) fn code_of(d: Dtype) -> i32 {
    match d {
        Dtype::Bool => 0,
        Dtype::Uint8 => 1,
        Dtype::Uint32 => 2,
        Dtype::Uint64 => 3,
        Dtype::Int32 => 4,
        Dtype::Int64 => 5,
        Dtype::Float16 => 6,
        Dtype::Bfloat16 => 7,
        Dtype::Float32 => 8,
        _ => -1,
    }
}

/// A shape argument, checked.
pub(super) fn shape_arg(shape: *const i32, ndim: i32, allow_minus_one: bool) -> Op<Vec<i32>> {
    if !(0..=MAX_NDIM).contains(&ndim) {
        return fail(format!("ndim must be in [0, {MAX_NDIM}], got {ndim}"));
    }
    if ndim == 0 {
        return Ok(Vec::new());
    }
    if shape.is_null() {
        return fail("null shape");
    }
    // SAFETY: the plugin passes `ndim` readable entries.
    let dims = unsafe { std::slice::from_raw_parts(shape, ndim as usize) }.to_vec();
    if let Some(d) = dims.iter().find(|&&d| d < 0 && !(allow_minus_one && d == -1)) {
        return fail(format!("negative dimension {d} in shape {dims:?}"));
    }
    Ok(dims)
}

/// `axis` of an `ndim`-dimensional array, made non-negative.
pub(super) fn axis_of(axis: i32, ndim: usize) -> Op<i32> {
    let n = ndim as i32;
    let a = if axis < 0 { axis + n } else { axis };
    if !(0..n).contains(&a) {
        return fail(format!("axis {axis} is out of range for a {ndim}-d array"));
    }
    Ok(a)
}

pub(super) fn scalar_array(value: f64, d: Dtype) -> Op<Array> {
    let a = match d {
        Dtype::Bool => Array::from_bool(value != 0.0),
        Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 => Array::from_f32(value as f32),
        Dtype::Int64 | Dtype::Uint64 => Array::from_slice(&[value as i64], &[]),
        _ => Array::from_slice(&[value as i32], &[]),
    };
    Ok(if a.dtype() == d { a } else { a.as_dtype(d)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{read_ids, read_logprobs};

    #[test]
    fn handles_are_checked_and_errors_recorded() {
        let ctx = HostCtx::new();
        let h = ctx.table();
        let t = unsafe { &*h };
        // Outside a call into the plugin nothing works.
        assert!(unsafe { (t.scalar)(h, 1.0, 8) }.is_null());
        let _entered = ctx.enter();
        let a = unsafe { (t.scalar)(h, 2.0, 8) };
        let b = unsafe { (t.arange)(h, 0.0, 4.0, 1.0, 8) };
        let sum = unsafe { (t.binary)(h, 0, a, b) };
        assert_eq!(unsafe { ((t.ndim)(h, sum), (t.dim)(h, sum, -1), (t.dtype)(h, sum)) }, (1, 4, 8));
        assert_eq!(read_logprobs(&ctx.get(sum).unwrap()).unwrap(), [2.0, 3.0, 4.0, 5.0]);
        assert_eq!(ctx.live_handles(), 3);
        unsafe { (t.release)(h, a) };
        // A released handle is refused, with a message; a NULL argument adds none.
        assert!(unsafe { (t.binary)(h, 0, a, b) }.is_null());
        assert!(ctx.last_error().contains("invalid or released"), "{}", ctx.last_error());
        *ctx.last_error.borrow_mut() = CString::default();
        assert!(unsafe { (t.unary)(h, 0, std::ptr::null_mut()) }.is_null());
        assert_eq!(ctx.last_error(), "");
        // MLX errors come back as NULL plus MLX's message.
        let shape = [3];
        let c = unsafe { (t.full)(h, shape.as_ptr(), 1, 1.0, 8) };
        assert!(unsafe { (t.binary)(h, 0, b, c) }.is_null());
        assert!(ctx.last_error().starts_with("binary:"), "{}", ctx.last_error());
        assert!(unsafe { (t.unary)(h, 99, b) }.is_null());
        assert!(ctx.last_error().contains("unknown unary op 99"));
        ctx.clear();
        assert_eq!(ctx.live_handles(), 0);
    }

    #[test]
    fn scatter_combines_repeated_indices_along_an_axis() {
        let ctx = HostCtx::new();
        let h = ctx.table();
        let t = unsafe { &*h };
        let _entered = ctx.enter();
        let target = ctx.insert(Array::from_slice(&[0i32, 0, 0, 10, 10, 10], &[2, 3]));
        let index = ctx.insert(Array::from_slice(&[2i32, 2, 0, 1, 1, 1], &[2, 3]));
        let updates = ctx.insert(Array::from_slice(&[5i32, 7, 1, 3, 20, 4], &[2, 3]));
        let max = unsafe { (t.scatter)(h, 2, target, index, updates, 1) };
        assert_eq!(read_ids(&ctx.get(max).unwrap()).unwrap(), [1, 0, 7, 10, 20, 10]);
        let add = unsafe { (t.scatter)(h, 1, target, index, updates, 1) };
        assert_eq!(read_ids(&ctx.get(add).unwrap()).unwrap(), [1, 0, 12, 10, 37, 10]);
        // Along axis 0 of the transposed problem gives the transposed answer.
        let [tt, ti, tu] = [target, index, updates].map(|x| ctx.insert(ctx.get(x).unwrap().transpose().unwrap()));
        let max_t = unsafe { (t.scatter)(h, 2, tt, ti, tu, 0) };
        let back = ctx.get(max_t).unwrap().transpose().unwrap();
        assert_eq!(read_ids(&back).unwrap(), [1, 0, 7, 10, 20, 10]);
        let bad = ctx.insert(Array::from_slice(&[1i32], &[1, 1]));
        assert!(unsafe { (t.scatter)(h, 1, target, bad, bad, 1) }.is_null());
        assert!(ctx.last_error().contains("must match"), "{}", ctx.last_error());
    }
}
