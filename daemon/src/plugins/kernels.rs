//! The ABI 1.1 operations `kernel_language` and `kernel`: a plugin's own CUDA kernel, queued as
//! one node of the step through MLX's custom-kernel support (the header's "Kernels" section is
//! the contract).
//!
//! Everything a plugin passes is checked before MLX sees it (names, counts, shapes, dtypes,
//! launch geometry). A kernel is compiled by MLX at its first evaluation, which would be inside
//! the engine's step, where a compiler error would fail every request of the batch; so the first
//! call of each (name, code, element types) in the process also runs the kernel once on
//! zero-filled inputs of the call's shapes and waits for it, and a kernel that fails there fails
//! only this call, with the compiler's message.

use super::host::*;
use crate::ffi::{CudaKernel, KernelSwitch};
use mlx_rs::{ops, Array, Dtype};
use mlxd_plugin_api::sys::{self, ArrayHandle};
use std::collections::HashSet;
use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

static SWITCH: KernelSwitch = KernelSwitch::new("MLXD_PLUGIN_KERNELS");

/// Offers plugins kernels or not (on unless `MLXD_PLUGIN_KERNELS=0`, and only on CUDA); read by
/// each instance when it is created.
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

/// The language new instances are offered.
pub(super) fn language() -> i32 {
    if SWITCH.available() {
        sys::KERNEL_CUDA
    } else {
        sys::KERNEL_NONE
    }
}

const MAX_INPUTS: i32 = 16;
const MAX_OUTPUTS: i32 = 8;
const MAX_NDIM: i32 = 8;
/// Most elements a call's outputs may have together (256 MiB of float32: logits of 256 rows of
/// a 256k-token vocabulary).
const MAX_OUTPUT_ELEMENTS: i64 = 1 << 26;

pub(super) unsafe extern "C" fn op_kernel_language(h: *const sys::Host) -> i32 {
    guarded(h, sys::KERNEL_NONE, |ctx| Ok(ctx.kernel_language))
}

pub(super) unsafe extern "C" fn op_kernel(
    h: *const sys::Host,
    k: *const sys::Kernel,
    launch: *const sys::KernelLaunch,
    outputs: *mut ArrayHandle,
) -> i32 {
    guarded(h, -1, |ctx| {
        if outputs.is_null() {
            return fail("kernel: null outputs");
        }
        let arrays = match unsafe { queue(ctx, k, launch) } {
            Err(OpError::Failed(m)) => return fail(format!("kernel: {m}")),
            other => other?,
        };
        let n = arrays.len();
        for (i, a) in arrays.into_iter().enumerate() {
            // SAFETY: the plugin passes room for n_outputs handles (checked count).
            unsafe { *outputs.add(i) = ctx.insert(a) };
        }
        Ok(n as i32)
    })
}

/// A NUL-terminated string argument, as UTF-8.
unsafe fn text<'a>(p: *const c_char, what: &str) -> Op<&'a str> {
    if p.is_null() {
        return fail(format!("null {what}"));
    }
    unsafe { CStr::from_ptr(p) }.to_str().or_else(|_| fail(format!("{what} is not UTF-8")))
}

fn identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// `n` identifiers from `names`.
unsafe fn names(names: *const *const c_char, n: i32, what: &str) -> Op<Vec<String>> {
    if names.is_null() {
        return fail(format!("null {what} names"));
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let s = unsafe { text(*names.add(i), &format!("{what} name {i}")) }?;
        if !identifier(s) {
            return fail(format!("{what} name {s:?} is not a C identifier of 1-64 characters"));
        }
        out.push(s.to_string());
    }
    Ok(out)
}

/// Where a kernel definition's code points. The header asks plugins to keep definitions in
/// static storage, so a call whose name, header and source are at the same addresses (and
/// whose parameter names read the same) is the same kernel: it was checked at its first call
/// and is not checked again (a step costs a lookup and a few short comparisons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KernelKey {
    name: usize,
    header: usize,
    source: usize,
    n_inputs: i32,
    n_outputs: i32,
}

impl KernelKey {
    fn of(k: &sys::Kernel) -> Self {
        KernelKey {
            name: k.name as usize,
            header: k.header as usize,
            source: k.source as usize,
            n_inputs: k.n_inputs,
            n_outputs: k.n_outputs,
        }
    }
}

/// Whether `k`'s parameter names are `known`'s (same counts, by the key).
unsafe fn same_names(known: &PluginKernel, k: &sys::Kernel) -> bool {
    let same = |names: *const *const c_char, want: &[String]| {
        !names.is_null()
            && want.iter().enumerate().all(|(i, w)| {
                let p = unsafe { *names.add(i) };
                !p.is_null() && unsafe { CStr::from_ptr(p) }.to_bytes() == w.as_bytes()
            })
    };
    same(k.input_names, &known.input_names) && same(k.output_names, &known.output_names)
}

static DEFINED: AtomicU64 = AtomicU64::new(0);

/// Plugin kernel definitions checked and made so far in this process: one per kernel per
/// plugin instance (tests check that a step does not define its kernel again).
pub fn definitions() -> u64 {
    DEFINED.load(Ordering::Relaxed)
}

/// Checks a kernel definition (name, code, parameter names) and makes its MLX kernel.
unsafe fn define(k: &sys::Kernel) -> Op<PluginKernel> {
    DEFINED.fetch_add(1, Ordering::Relaxed);
    let name = unsafe { text(k.name, "name") }?;
    if !identifier(name) {
        return fail(format!("name {name:?} must be 1-64 of [A-Za-z0-9_], not starting with a digit"));
    }
    let what = |m: String| OpError::Failed(format!("`{name}`: {m}"));
    let source = unsafe { text(k.source, "source") }.map_err(|_| what("null or non-UTF-8 source".into()))?;
    let header = if k.header.is_null() {
        ""
    } else {
        unsafe { text(k.header, "header") }.map_err(|_| what("non-UTF-8 header".into()))?
    };
    if !(1..=MAX_INPUTS).contains(&k.n_inputs) || !(1..=MAX_OUTPUTS).contains(&k.n_outputs) {
        return Err(what(format!(
            "{} inputs and {} outputs; 1-{MAX_INPUTS} and 1-{MAX_OUTPUTS} are allowed",
            k.n_inputs, k.n_outputs
        )));
    }
    let input_names = unsafe { names(k.input_names, k.n_inputs, "input") }.map_err(|e| prefix(e, name))?;
    let output_names = unsafe { names(k.output_names, k.n_outputs, "output") }.map_err(|e| prefix(e, name))?;
    let mut seen = HashSet::new();
    if let Some(dup) = input_names.iter().chain(&output_names).find(|n| !seen.insert(n.as_str())) {
        return Err(what(format!("parameter name {dup:?} is used twice")));
    }
    let ins: Vec<&str> = input_names.iter().map(String::as_str).collect();
    let outs: Vec<&str> = output_names.iter().map(String::as_str).collect();
    let kernel = CudaKernel::new(&format!("plugin_{name}"), &ins, &outs, header, source, true);
    Ok(PluginKernel {
        name: name.to_string(),
        signature: format!("{name}\u{0}{header}\u{0}{source}"),
        input_names,
        output_names,
        kernel,
        compiled: Default::default(),
    })
}

/// Checks a call and queues the kernel; the error says what is wrong.
unsafe fn queue(ctx: &HostCtx, k: *const sys::Kernel, launch: *const sys::KernelLaunch) -> Op<Vec<Array>> {
    if ctx.kernel_language == sys::KERNEL_NONE {
        return fail("this host compiles no kernels (kernel_language is MLXD_KERNEL_NONE): use operations here");
    }
    let (Some(k), Some(l)) = (unsafe { k.as_ref() }, unsafe { launch.as_ref() }) else {
        return fail("null kernel or launch");
    };
    if k.struct_size < std::mem::size_of::<sys::Kernel>() || l.struct_size < std::mem::size_of::<sys::KernelLaunch>() {
        return fail(format!(
            "mlxd_kernel / mlxd_kernel_launch of {} / {} bytes; ABI 1.1 defines {} / {}",
            k.struct_size,
            l.struct_size,
            std::mem::size_of::<sys::Kernel>(),
            std::mem::size_of::<sys::KernelLaunch>()
        ));
    }
    let entry = ctx.kernel(KernelKey::of(k), |known| unsafe { same_names(known, k) }, || unsafe { define(k) })?;
    let (name, output_names) = (entry.name.as_str(), &entry.output_names);
    let what = |m: String| OpError::Failed(format!("`{name}`: {m}"));

    if l.inputs.is_null() || l.output_ndims.is_null() || l.output_dtypes.is_null() {
        return Err(what("null inputs, output_ndims or output_dtypes".into()));
    }
    let mut inputs = Vec::with_capacity(k.n_inputs as usize);
    for i in 0..k.n_inputs as usize {
        inputs.push(ctx.arg(unsafe { *l.inputs.add(i) }).map_err(|e| prefix(e, name))?);
    }
    let mut shapes = Vec::with_capacity(k.n_outputs as usize);
    let (mut at, mut total) = (0usize, 0i64);
    for (i, output) in output_names.iter().enumerate() {
        let ndim = unsafe { *l.output_ndims.add(i) };
        if !(0..=MAX_NDIM).contains(&ndim) {
            return Err(what(format!("output {output:?} has {ndim} dimensions; 0-{MAX_NDIM} are allowed")));
        }
        if ndim > 0 && l.output_shapes.is_null() {
            return Err(what("null output_shapes".into()));
        }
        let dims: Vec<i32> = (0..ndim as usize).map(|j| unsafe { *l.output_shapes.add(at + j) }).collect();
        at += ndim as usize;
        let size = dims
            .iter()
            .try_fold(1i64, |acc, &d| (d >= 0).then(|| acc * d as i64).filter(|&s| s <= MAX_OUTPUT_ELEMENTS));
        total += size.unwrap_or(i64::MAX / 2);
        if size.is_none() || total > MAX_OUTPUT_ELEMENTS {
            return Err(what(format!(
                "output {output:?} has shape {dims:?}: negative, or more than {MAX_OUTPUT_ELEMENTS} elements in all outputs"
            )));
        }
        let dtype = dtype_of(unsafe { *l.output_dtypes.add(i) }).map_err(|e| prefix(e, name))?;
        shapes.push((dims, dtype));
    }
    if l.grid.iter().any(|&g| g < 1) || l.block.iter().any(|&b| b < 1) {
        return Err(what(format!("grid {:?} and block {:?} must be >= 1 along every axis", l.grid, l.block)));
    }
    let threads = l.block.iter().map(|&b| b as i64).product::<i64>();
    if threads > 1024 {
        return Err(what(format!("block {:?} has {threads} threads; at most 1024", l.block)));
    }
    // CUDA's limits on blocks along y and z (x allows 2^31 - 1, more than an i32 grid can ask).
    let blocks = |axis: usize| (l.grid[axis] as i64 + l.block[axis] as i64 - 1) / l.block[axis] as i64;
    if blocks(1) > 65_535 || blocks(2) > 65_535 {
        return Err(what(format!(
            "grid {:?} in blocks of {:?} is more than 65,535 blocks along y or z",
            l.grid, l.block
        )));
    }

    let grid = (l.grid[0], l.grid[1], l.grid[2]);
    let block = (l.block[0], l.block[1], l.block[2]);
    let outputs: Vec<(&[i32], Dtype)> = shapes.iter().map(|(s, d)| (&s[..], *d)).collect();
    let run = |inputs: &[&Array]| {
        entry.kernel.apply(inputs, &outputs, &[], grid, block, || format!("plugin kernel `{name}`"))
    };

    // The first call of this code with these element types compiles it, here, on zeros.
    let dtypes: Vec<Dtype> = inputs.iter().map(Array::dtype).chain(shapes.iter().map(|(_, d)| *d)).collect();
    if !entry.compiled.borrow().contains(&dtypes) {
        let signature = format!("{}\u{0}{dtypes:?}", entry.signature);
        static COMPILED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
        let known =
            COMPILED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashSet::new).contains(&signature);
        if !known {
            let zeros = inputs.iter().map(|a| ops::zeros_dtype(a.shape(), a.dtype())).collect::<Result<Vec<_>, _>>()?;
            let trial = run(&zeros.iter().collect::<Vec<_>>()).and_then(|outs| mlx_rs::transforms::eval(outs.iter()));
            if let Err(e) = trial {
                return Err(what(format!(
                    "does not compile or run (on zero inputs of this call's shapes): {}",
                    e.what()
                )));
            }
            COMPILED.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashSet::new).insert(signature);
        }
        entry.compiled.borrow_mut().push(dtypes);
    }
    Ok(run(&inputs.iter().collect::<Vec<_>>())?)
}

fn prefix(e: OpError, name: &str) -> OpError {
    match e {
        OpError::Failed(m) => OpError::Failed(format!("`{name}`: {m}")),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls `kernel` (a copy of `x`, a float32 `[2]`) as `name` with the output names `outs`,
    /// an output of `shape`, `grid` threads in blocks of `block`; returns what it returned.
    fn call(ctx: &HostCtx, name: &CStr, outs: &[*const c_char; 1], geometry: [[i32; 3]; 2], shape: &[i32; 1]) -> i32 {
        let [grid, block] = geometry;
        let h = ctx.table();
        let x = ctx.insert(Array::from_slice(&[1.0f32, 2.0], &[2]));
        let inputs: [*const c_char; 1] = [c"x".as_ptr()];
        let k = sys::Kernel {
            struct_size: std::mem::size_of::<sys::Kernel>(),
            name: name.as_ptr(),
            header: std::ptr::null(),
            source: c"y[threadIdx.x] = x[threadIdx.x];".as_ptr(),
            n_inputs: 1,
            input_names: inputs.as_ptr(),
            n_outputs: 1,
            output_names: outs.as_ptr(),
        };
        let (ndim, dtype) = ([1i32], [code_of(Dtype::Float32)]);
        let launch = sys::KernelLaunch {
            struct_size: std::mem::size_of::<sys::KernelLaunch>(),
            inputs: &x,
            output_shapes: shape.as_ptr(),
            output_ndims: ndim.as_ptr(),
            output_dtypes: dtype.as_ptr(),
            grid,
            block,
        };
        let mut out: ArrayHandle = std::ptr::null_mut();
        let n = unsafe { ((*h).kernel)(h, &k, &launch, &mut out) };
        assert!(n > 0 || out.is_null(), "a failed call writes no handle");
        n
    }

    /// A checked definition without MLX behind it (the CPU cannot make CUDA kernels).
    fn inert(name: &str, input: &str) -> PluginKernel {
        PluginKernel {
            name: name.into(),
            signature: name.into(),
            input_names: vec![input.into()],
            output_names: vec!["y".into()],
            kernel: CudaKernel::inert(name),
            compiled: Default::default(),
        }
    }

    #[test]
    fn a_definition_is_made_once_for_its_code_and_names_and_only_so_many() {
        let ctx = HostCtx::with_kernel_language(sys::KERNEL_CUDA);
        let key = |source: usize| KernelKey { name: 1, header: 0, source, n_inputs: 1, n_outputs: 1 };
        let made = std::cell::Cell::new(0);
        let get = |k: KernelKey, input: &'static str| {
            ctx.kernel(k, |known| known.input_names[0] == input, || {
                made.set(made.get() + 1);
                Ok(inert("k", input))
            })
        };
        for _ in 0..5 {
            assert!(get(key(10), "x").is_ok());
        }
        assert_eq!(made.get(), 1, "one definition for five calls");
        assert!(get(key(10), "w").is_ok()); // the same code with other parameter names: made again
        assert_eq!((made.get(), ctx.kernel_count()), (2, 1));
        for source in 11..(10 + MAX_KERNELS) {
            assert!(get(key(source), "x").is_ok());
        }
        assert_eq!(ctx.kernel_count(), MAX_KERNELS);
        let Err(OpError::Failed(e)) = get(key(1000), "x") else { panic!("a definition past the limit was made") };
        assert!(e.contains("static storage"), "{e}");
        assert!(get(key(10), "w").is_ok()); // known ones still work
    }

    #[test]
    fn without_cuda_there_are_no_kernels_and_a_call_says_why() {
        let ctx = HostCtx::new();
        let _entered = ctx.enter();
        // The tests run MLX on the CPU.
        assert_eq!(unsafe { ((*ctx.table()).kernel_language)(ctx.table()) }, sys::KERNEL_NONE);
        assert_eq!(call(&ctx, c"copy", &[c"y".as_ptr()], [[2, 1, 1], [2, 1, 1]], &[2]), -1);
        assert!(ctx.last_error().contains("compiles no kernels"), "{}", ctx.last_error());
    }

    #[test]
    fn calls_are_checked_before_mlx_sees_them() {
        let ctx = HostCtx::with_kernel_language(sys::KERNEL_CUDA);
        let _entered = ctx.enter();
        let (y, x, bad) = ([c"y".as_ptr()], [c"x".as_ptr()], [c"2x".as_ptr()]);
        let ok = [[2, 1, 1], [2, 1, 1]];
        for (name, outs, geometry, shape, expect) in [
            (c"bad name", &y, ok, [2], "must be 1-64 of [A-Za-z0-9_]"),
            (c"k", &x, ok, [2], "\"x\" is used twice"),
            (c"k", &bad, ok, [2], "\"2x\" is not a C identifier"),
            (c"k", &y, [[64, 32, 1], [64, 32, 1]], [2], "2048 threads; at most 1024"),
            (c"k", &y, [[2, 1, 1], [0, 1, 1]], [2], "must be >= 1"),
            (c"k", &y, [[1, 70_000, 1], [1, 1, 1]], [2], "more than 65,535 blocks"),
            (c"k", &y, ok, [-3], "negative, or more than"),
            (c"k", &y, ok, [1 << 27], "negative, or more than"),
        ] {
            assert_eq!(call(&ctx, name, outs, geometry, &shape), -1);
            let e = ctx.last_error();
            assert!(e.starts_with("kernel: ") && e.contains(expect), "{e}");
        }
    }
}
