//! The operations of the host table, one `extern "C"` function each, in the header's order.
//! Each resolves its handles in the calling instance's table ([`super::host`]), runs MLX through
//! mlx-rs, and returns a new handle or NULL with a recorded message.

use super::host::*;
use mlx_rs::ops::indexing::{
    argmax_axis, argmin_axis, scatter_add_single, scatter_max_single, scatter_min_single, scatter_single, topk_axis,
};
use mlx_rs::ops::{self, argpartition_axis, argsort_axis, sort_axis};
use mlx_rs::{random, Array, Dtype};
use mlxd_plugin_api::sys::{self, ArrayHandle};
use std::ffi::{c_char, c_void};

// -- errors and handles -------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_last_error(h: *const sys::Host) -> *const c_char {
    match current(h) {
        // The CString lives until the next recorded error, which the header allows.
        Some(ctx) => ctx.last_error.borrow().as_ptr(),
        None => c"host operation called outside a call into the plugin, or from another thread".as_ptr(),
    }
}

pub(super) unsafe extern "C" fn op_release(h: *const sys::Host, a: ArrayHandle) {
    guarded(h, (), |ctx| {
        if !a.is_null() && ctx.take(a).is_none() {
            return fail(format!("release: invalid or already released handle {a:p}"));
        }
        Ok(())
    })
}

pub(super) unsafe extern "C" fn op_retain(h: *const sys::Host, a: ArrayHandle) -> ArrayHandle {
    array_op(h, "retain", |ctx| ctx.arg(a))
}

// -- queries ------------------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_ndim(h: *const sys::Host, a: ArrayHandle) -> i32 {
    guarded(h, -1, |ctx| Ok(ctx.arg(a)?.ndim() as i32))
}

pub(super) unsafe extern "C" fn op_dim(h: *const sys::Host, a: ArrayHandle, axis: i32) -> i32 {
    guarded(h, -1, |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        Ok(a.shape()[axis as usize])
    })
}

pub(super) unsafe extern "C" fn op_dtype(h: *const sys::Host, a: ArrayHandle) -> i32 {
    guarded(h, -1, |ctx| Ok(code_of(ctx.arg(a)?.dtype())))
}

pub(super) unsafe extern "C" fn op_size(h: *const sys::Host, a: ArrayHandle) -> i64 {
    guarded(h, -1, |ctx| Ok(ctx.arg(a)?.size() as i64))
}

// -- construction -------------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_from_data(
    h: *const sys::Host,
    data: *const c_void,
    shape: *const i32,
    ndim: i32,
    dtype: i32,
) -> ArrayHandle {
    array_op(h, "from_data", |_| {
        let d = dtype_of(dtype)?;
        let shape = shape_arg(shape, ndim, false)?;
        let n: i64 = shape.iter().map(|&x| x as i64).product();
        if n > MAX_FROM_DATA {
            return fail(format!("{n} elements is more than the {MAX_FROM_DATA} allowed"));
        }
        if data.is_null() && n > 0 {
            return fail("null data");
        }
        if n == 0 {
            return Ok(Array::zeros::<f32>(&shape)?.as_dtype(d)?);
        }
        // SAFETY: mlx copies `n` elements of `d` from `data`.
        Ok(unsafe { Array::from_raw_data(data, &shape, d) })
    })
}

pub(super) unsafe extern "C" fn op_scalar(h: *const sys::Host, value: f64, dtype: i32) -> ArrayHandle {
    array_op(h, "scalar", |_| scalar_array(value, dtype_of(dtype)?))
}

pub(super) unsafe extern "C" fn op_full(
    h: *const sys::Host,
    shape: *const i32,
    ndim: i32,
    value: f64,
    dtype: i32,
) -> ArrayHandle {
    array_op(h, "full", |_| {
        let shape = shape_arg(shape, ndim, false)?;
        let s = scalar_array(value, dtype_of(dtype)?)?;
        Ok(ops::broadcast_to(&s, &shape)?)
    })
}

pub(super) unsafe extern "C" fn op_arange(
    h: *const sys::Host,
    start: f64,
    stop: f64,
    step: f64,
    dtype: i32,
) -> ArrayHandle {
    array_op(h, "arange", |_| {
        if step == 0.0 || !step.is_finite() || !start.is_finite() || !stop.is_finite() {
            return fail(format!("arange({start}, {stop}, {step}): bounds must be finite and the step non-zero"));
        }
        if ((stop - start) / step).ceil() > MAX_FROM_DATA as f64 {
            return fail("arange: too many elements");
        }
        let d = dtype_of(dtype)?;
        let a = match d {
            Dtype::Int32 => Array::arange::<f64, i32>(start, stop, step)?,
            Dtype::Int64 => Array::arange::<f64, i64>(start, stop, step)?,
            Dtype::Uint32 => Array::arange::<f64, u32>(start, stop, step)?,
            _ => Array::arange::<f64, f32>(start, stop, step)?.as_dtype(d)?,
        };
        Ok(a)
    })
}

// -- elementwise --------------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_unary(h: *const sys::Host, op: i32, a: ArrayHandle) -> ArrayHandle {
    array_op(h, "unary", |ctx| {
        let a = ctx.arg(a)?;
        Ok(match op {
            0 => a.negative()?,
            1 => a.abs()?,
            2 => a.exp()?,
            3 => a.log()?,
            4 => a.log1p()?,
            5 => a.sqrt()?,
            6 => a.square()?,
            7 => a.floor()?,
            8 => ops::ceil(&a)?,
            9 => ops::sigmoid(&a)?,
            10 => ops::tanh(&a)?,
            11 => a.logical_not()?,
            12 => a.is_nan()?,
            13 => a.is_inf()?,
            14 => a.is_finite()?,
            15 => a.reciprocal()?,
            other => return fail(format!("unknown unary op {other}")),
        })
    })
}

pub(super) unsafe extern "C" fn op_binary(h: *const sys::Host, op: i32, a: ArrayHandle, b: ArrayHandle) -> ArrayHandle {
    array_op(h, "binary", |ctx| {
        let (a, b) = (ctx.arg(a)?, ctx.arg(b)?);
        Ok(match op {
            0 => a.add(&b)?,
            1 => a.subtract(&b)?,
            2 => a.multiply(&b)?,
            3 => a.divide(&b)?,
            4 => a.power(&b)?,
            5 => ops::maximum(&a, &b)?,
            6 => ops::minimum(&a, &b)?,
            7 => a.remainder(&b)?,
            8 => a.floor_divide(&b)?,
            9 => ops::logaddexp(&a, &b)?,
            10 => a.eq(&b)?,
            11 => a.ne(&b)?,
            12 => a.lt(&b)?,
            13 => a.le(&b)?,
            14 => a.gt(&b)?,
            15 => a.ge(&b)?,
            16 => a.logical_and(&b)?,
            17 => a.logical_or(&b)?,
            other => return fail(format!("unknown binary op {other}")),
        })
    })
}

pub(super) unsafe extern "C" fn op_where(
    h: *const sys::Host,
    cond: ArrayHandle,
    a: ArrayHandle,
    b: ArrayHandle,
) -> ArrayHandle {
    array_op(h, "where", |ctx| Ok(ops::select(&ctx.arg(cond)?, &ctx.arg(a)?, &ctx.arg(b)?)?))
}

pub(super) unsafe extern "C" fn op_astype(h: *const sys::Host, a: ArrayHandle, dtype: i32) -> ArrayHandle {
    array_op(h, "astype", |ctx| Ok(ctx.arg(a)?.as_dtype(dtype_of(dtype)?)?))
}

// -- reductions ---------------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_reduce(
    h: *const sys::Host,
    op: i32,
    a: ArrayHandle,
    axis: i32,
    keepdims: i32,
) -> ArrayHandle {
    array_op(h, "reduce", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        let keep = keepdims != 0;
        Ok(match op {
            0 => a.sum_axis(axis, keep)?,
            1 => a.max_axis(axis, keep)?,
            2 => a.min_axis(axis, keep)?,
            3 => a.prod_axis(axis, keep)?,
            4 => a.mean_axis(axis, keep)?,
            5 => a.any_axis(axis, keep)?,
            6 => a.all_axis(axis, keep)?,
            7 => a.logsumexp_axis(axis, keep)?,
            8 => argmax_axis(&a, axis, keep)?.as_type::<u32>()?,
            9 => argmin_axis(&a, axis, keep)?.as_type::<u32>()?,
            other => return fail(format!("unknown reduce op {other}")),
        })
    })
}

pub(super) unsafe extern "C" fn op_softmax(h: *const sys::Host, a: ArrayHandle, axis: i32) -> ArrayHandle {
    array_op(h, "softmax", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        Ok(ops::softmax_axis(&a, axis, true)?)
    })
}

pub(super) unsafe extern "C" fn op_cumulative(
    h: *const sys::Host,
    op: i32,
    a: ArrayHandle,
    axis: i32,
    reverse: i32,
    inclusive: i32,
) -> ArrayHandle {
    array_op(h, "cumulative", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        let (r, i) = (reverse != 0, inclusive != 0);
        Ok(match op {
            0 => a.cumsum(axis, r, i)?,
            1 => a.cumprod(axis, r, i)?,
            2 => a.cummax(axis, r, i)?,
            3 => a.cummin(axis, r, i)?,
            other => return fail(format!("unknown cumulative op {other}")),
        })
    })
}

// -- sorting ------------------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_sort(h: *const sys::Host, a: ArrayHandle, axis: i32) -> ArrayHandle {
    array_op(h, "sort", |ctx| {
        let a = ctx.arg(a)?;
        Ok(sort_axis(&a, axis_of(axis, a.ndim())?)?)
    })
}

pub(super) unsafe extern "C" fn op_argsort(h: *const sys::Host, a: ArrayHandle, axis: i32) -> ArrayHandle {
    array_op(h, "argsort", |ctx| {
        let a = ctx.arg(a)?;
        Ok(argsort_axis(&a, axis_of(axis, a.ndim())?)?.as_type::<u32>()?)
    })
}

pub(super) unsafe extern "C" fn op_argpartition(
    h: *const sys::Host,
    a: ArrayHandle,
    kth: i32,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "argpartition", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        let n = a.shape()[axis as usize];
        if !(0..n).contains(&kth) {
            return fail(format!("kth {kth} is out of range for an axis of {n}"));
        }
        Ok(argpartition_axis(&a, kth, axis)?.as_type::<u32>()?)
    })
}

pub(super) unsafe extern "C" fn op_topk(h: *const sys::Host, a: ArrayHandle, k: i32, axis: i32) -> ArrayHandle {
    array_op(h, "topk", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        let n = a.shape()[axis as usize];
        if !(1..=n).contains(&k) {
            return fail(format!("k {k} is out of range for an axis of {n}"));
        }
        Ok(topk_axis(&a, k, axis)?)
    })
}

// -- indexing -----------------------------------------------------------------------------------

fn integer(a: &Array, what: &str) -> Op<()> {
    if crate::sampling::is_integer(a.dtype()) {
        return Ok(());
    }
    fail(format!("{what} must have an integer dtype, got {:?}", a.dtype()))
}

pub(super) unsafe extern "C" fn op_take(
    h: *const sys::Host,
    a: ArrayHandle,
    indices: ArrayHandle,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "take", |ctx| {
        let (a, i) = (ctx.arg(a)?, ctx.arg(indices)?);
        integer(&i, "indices")?;
        let axis = axis_of(axis, a.ndim())?;
        Ok(a.take_axis(&i, axis)?)
    })
}

pub(super) unsafe extern "C" fn op_take_along_axis(
    h: *const sys::Host,
    a: ArrayHandle,
    indices: ArrayHandle,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "take_along_axis", |ctx| {
        let (a, i) = (ctx.arg(a)?, ctx.arg(indices)?);
        integer(&i, "indices")?;
        let axis = axis_of(axis, a.ndim())?;
        Ok(a.take_along_axis(&i, axis)?)
    })
}

pub(super) unsafe extern "C" fn op_put_along_axis(
    h: *const sys::Host,
    a: ArrayHandle,
    indices: ArrayHandle,
    values: ArrayHandle,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "put_along_axis", |ctx| {
        let (a, i, v) = (ctx.arg(a)?, ctx.arg(indices)?, ctx.arg(values)?);
        integer(&i, "indices")?;
        let axis = axis_of(axis, a.ndim())?;
        Ok(a.put_along_axis(&i, &v.as_dtype(a.dtype())?, axis)?)
    })
}

pub(super) unsafe extern "C" fn op_scatter(
    h: *const sys::Host,
    mode: i32,
    a: ArrayHandle,
    indices: ArrayHandle,
    updates: ArrayHandle,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "scatter", |ctx| {
        let (a, i, u) = (ctx.arg(a)?, ctx.arg(indices)?, ctx.arg(updates)?);
        integer(&i, "indices")?;
        let axis = axis_of(axis, a.ndim())?;
        if i.shape() != u.shape() || i.ndim() != a.ndim() {
            return fail(format!(
                "indices {:?} and updates {:?} must have one shape, of a's rank ({:?})",
                i.shape(),
                u.shape(),
                a.shape()
            ));
        }
        let (a_shape, i_shape) = (a.shape().to_vec(), i.shape().to_vec());
        for d in 0..a.ndim() {
            if d as i32 != axis && a_shape[d] != i_shape[d] {
                return fail(format!("indices {i_shape:?} must match a {a_shape:?} except along axis {axis}"));
            }
        }
        // Move `axis` last (unless it is), flatten to rows, scatter at row * N + index, and undo.
        let last = a.ndim() as i32 - 1;
        let to_last = |x: &Array| -> Op<Array> {
            if axis == last {
                Ok(x.clone())
            } else {
                Ok(x.swap_axes(axis, last)?)
            }
        };
        let (at, it, ut) = (to_last(&a)?, to_last(&i)?, to_last(&u)?);
        let moved = at.shape().to_vec();
        let n = a_shape[axis as usize];
        let rows: i32 = moved[..moved.len() - 1].iter().product();
        let m = i_shape[axis as usize];
        let base = Array::arange::<i32, i32>(0, rows * n, n)?.reshape(&[rows, 1])?;
        let flat = it.reshape(&[rows, m])?.as_type::<i32>()?.add(&base)?.reshape(&[-1])?;
        let values = ut.reshape(&[-1, 1])?.as_dtype(a.dtype())?;
        let target = at.reshape(&[-1])?;
        let out = match mode {
            0 => scatter_single(&target, &flat, &values, 0)?,
            1 => scatter_add_single(&target, &flat, &values, 0)?,
            2 => scatter_max_single(&target, &flat, &values, 0)?,
            3 => scatter_min_single(&target, &flat, &values, 0)?,
            other => return fail(format!("unknown scatter mode {other}")),
        };
        to_last(&out.reshape(&moved)?)
    })
}

// -- shapes -------------------------------------------------------------------------------------

pub(super) unsafe extern "C" fn op_reshape(
    h: *const sys::Host,
    a: ArrayHandle,
    shape: *const i32,
    ndim: i32,
) -> ArrayHandle {
    array_op(h, "reshape", |ctx| {
        let a = ctx.arg(a)?;
        Ok(a.reshape(&shape_arg(shape, ndim, true)?)?)
    })
}

pub(super) unsafe extern "C" fn op_slice(
    h: *const sys::Host,
    a: ArrayHandle,
    axis: i32,
    start: i32,
    stop: i32,
    step: i32,
) -> ArrayHandle {
    array_op(h, "slice", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        if step <= 0 {
            return fail(format!("step must be positive, got {step}"));
        }
        let n = a.shape()[axis as usize];
        let clamp = |x: i32| (if x < 0 { x + n } else { x }).clamp(0, n);
        let (start, stop) = (clamp(start), clamp(stop).max(clamp(start)));
        strided_slice(&a, axis as usize, start, stop, step)
    })
}

/// `a[..., start:stop:step, ...]` along `axis` as a view (MLX's Slice: no kernel, no copy).
fn strided_slice(a: &Array, axis: usize, start: i32, stop: i32, step: i32) -> Op<Array> {
    let shape = a.shape();
    let mut starts = vec![0; shape.len()];
    let mut stops = shape.to_vec();
    let mut strides = vec![1; shape.len()];
    (starts[axis], stops[axis], strides[axis]) = (start, stop, step);
    let out = crate::ffi::array_op(|res, stream| {
        // SAFETY: mlx-c's slice with an array and bounds that outlive the call.
        unsafe {
            mlx_sys::mlx_slice(
                res,
                a.as_ptr(),
                starts.as_ptr(),
                starts.len(),
                stops.as_ptr(),
                stops.len(),
                strides.as_ptr(),
                strides.len(),
                stream,
            )
        }
    });
    match out {
        Some(sliced) => Ok(sliced),
        None => fail(format!("slice {start}:{stop}:{step} of axis {axis} of {shape:?} failed")),
    }
}

pub(super) unsafe extern "C" fn op_concatenate(
    h: *const sys::Host,
    arrays: *const ArrayHandle,
    n: i32,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "concatenate", |ctx| {
        if !(1..=4096).contains(&n) || arrays.is_null() {
            return fail(format!("needs 1 to 4096 arrays, got {n}"));
        }
        // SAFETY: the plugin passes `n` handles.
        let handles = unsafe { std::slice::from_raw_parts(arrays, n as usize) };
        let list = handles.iter().map(|&x| ctx.arg(x)).collect::<Op<Vec<Array>>>()?;
        let axis = axis_of(axis, list[0].ndim())?;
        Ok(ops::concatenate(&list, axis)?)
    })
}

pub(super) unsafe extern "C" fn op_broadcast_to(
    h: *const sys::Host,
    a: ArrayHandle,
    shape: *const i32,
    ndim: i32,
) -> ArrayHandle {
    array_op(h, "broadcast_to", |ctx| Ok(ops::broadcast_to(&ctx.arg(a)?, &shape_arg(shape, ndim, false)?)?))
}

pub(super) unsafe extern "C" fn op_expand_dims(h: *const sys::Host, a: ArrayHandle, axis: i32) -> ArrayHandle {
    array_op(h, "expand_dims", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim() + 1)?;
        Ok(ops::expand_dims(&a, axis)?)
    })
}

pub(super) unsafe extern "C" fn op_squeeze(h: *const sys::Host, a: ArrayHandle, axis: i32) -> ArrayHandle {
    array_op(h, "squeeze", |ctx| {
        let a = ctx.arg(a)?;
        let axis = axis_of(axis, a.ndim())?;
        Ok(a.squeeze_axes(&[axis])?)
    })
}

// -- random -------------------------------------------------------------------------------------

fn key_arg(ctx: &HostCtx, key: ArrayHandle) -> Op<Array> {
    let k = ctx.arg(key)?;
    if k.shape() != [2] || k.dtype() != Dtype::Uint32 {
        return fail(format!("a key is a [2] uint32 array, got {:?} {:?}", k.shape(), k.dtype()));
    }
    Ok(k)
}

fn float_dtype(code: i32) -> Op<Dtype> {
    match dtype_of(code)? {
        d @ (Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32) => Ok(d),
        other => fail(format!("random draws are float, got {other:?}")),
    }
}

pub(super) unsafe extern "C" fn op_random_split(h: *const sys::Host, key: ArrayHandle, num: i32) -> ArrayHandle {
    array_op(h, "random_split", |ctx| {
        if !(1..=1024).contains(&num) {
            return fail(format!("num must be in [1, 1024], got {num}"));
        }
        let mut rest = key_arg(ctx, key)?;
        let mut keys = Vec::with_capacity(num as usize);
        for _ in 1..num {
            let (k, r) = random::split(&rest, 2)?;
            keys.push(k);
            rest = r;
        }
        keys.push(rest);
        Ok(ops::stack(&keys, 0)?)
    })
}

pub(super) unsafe extern "C" fn op_random_uniform(
    h: *const sys::Host,
    key: ArrayHandle,
    shape: *const i32,
    ndim: i32,
    dtype: i32,
) -> ArrayHandle {
    array_op(h, "random_uniform", |ctx| {
        let (k, shape, d) = (key_arg(ctx, key)?, shape_arg(shape, ndim, false)?, float_dtype(dtype)?);
        Ok(random::uniform::<f32, f32>(0.0, 1.0, &shape[..], &k)?.as_dtype(d)?)
    })
}

pub(super) unsafe extern "C" fn op_random_normal(
    h: *const sys::Host,
    key: ArrayHandle,
    shape: *const i32,
    ndim: i32,
    dtype: i32,
) -> ArrayHandle {
    array_op(h, "random_normal", |ctx| {
        let (k, shape, d) = (key_arg(ctx, key)?, shape_arg(shape, ndim, false)?, float_dtype(dtype)?);
        Ok(random::normal::<f32>(&shape[..], None, None, &k)?.as_dtype(d)?)
    })
}

pub(super) unsafe extern "C" fn op_random_gumbel(
    h: *const sys::Host,
    key: ArrayHandle,
    shape: *const i32,
    ndim: i32,
    dtype: i32,
) -> ArrayHandle {
    array_op(h, "random_gumbel", |ctx| {
        let (k, shape, d) = (key_arg(ctx, key)?, shape_arg(shape, ndim, false)?, float_dtype(dtype)?);
        Ok(random::gumbel::<f32>(&shape[..], &k)?.as_dtype(d)?)
    })
}

pub(super) unsafe extern "C" fn op_random_categorical(
    h: *const sys::Host,
    key: ArrayHandle,
    logits: ArrayHandle,
    axis: i32,
) -> ArrayHandle {
    array_op(h, "random_categorical", |ctx| {
        let (k, l) = (key_arg(ctx, key)?, ctx.arg(logits)?);
        let axis = axis_of(axis, l.ndim())?;
        Ok(random::categorical(&l, axis, None, &k)?.as_type::<u32>()?)
    })
}
