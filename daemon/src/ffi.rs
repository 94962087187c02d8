//! Calls into mlx-c for operations mlx-rs does not wrap (or wraps with extra nodes).

use mlx_rs::Array;
use std::os::raw::c_int;

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
