//! Safe wrappers over the host's operation table: [`Host`] makes arrays, [`Array`] owns one
//! handle (released on drop) and has a method per operation. Every operation returns
//! `Result<Array, Error>`; a host failure carries the host's message.

use crate::plugin::Error;
use crate::sys::{self, ArrayHandle};
use std::ffi::{c_void, CStr};

/// Element types (`mlxd_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
#[allow(missing_docs)]
pub enum Dtype {
    Bool = 0,
    Uint8 = 1,
    Uint32 = 2,
    Uint64 = 3,
    Int32 = 4,
    Int64 = 5,
    Float16 = 6,
    Bfloat16 = 7,
    Float32 = 8,
}

impl Dtype {
    /// The dtype of an `mlxd_dtype` code.
    pub fn from_code(code: i32) -> Option<Dtype> {
        use Dtype::*;
        [Bool, Uint8, Uint32, Uint64, Int32, Int64, Float16, Bfloat16, Float32].into_iter().find(|d| *d as i32 == code)
    }

    /// Whether it holds floating-point numbers.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32)
    }

    /// Whether it holds integers (not bool).
    pub fn is_integer(self) -> bool {
        matches!(self, Dtype::Uint8 | Dtype::Uint32 | Dtype::Uint64 | Dtype::Int32 | Dtype::Int64)
    }
}

/// Host element types [`Host::from_slice`] accepts.
pub trait Element: Copy {
    /// Its dtype.
    const DTYPE: Dtype;
}
impl Element for f32 {
    const DTYPE: Dtype = Dtype::Float32;
}
impl Element for i32 {
    const DTYPE: Dtype = Dtype::Int32;
}
impl Element for u32 {
    const DTYPE: Dtype = Dtype::Uint32;
}
impl Element for i64 {
    const DTYPE: Dtype = Dtype::Int64;
}
impl Element for bool {
    const DTYPE: Dtype = Dtype::Bool;
}

/// How [`Array::scatter`] combines updates that meet at one place (`mlxd_scatter_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
#[allow(missing_docs)]
pub enum ScatterMode {
    Set = 0,
    Add = 1,
    Max = 2,
    Min = 3,
}

/// The host's operation table, for one plugin instance. Cheap to copy; valid for the calls the
/// host makes into the plugin, on that thread (see the header's rules).
#[derive(Clone, Copy)]
pub struct Host {
    raw: *const sys::Host,
}

/// An owned array handle, released when dropped (or a borrowed one, never released: the
/// logits, history and key the host passes in). Clone makes a new owned handle (`retain`).
pub struct Array {
    host: Host,
    handle: ArrayHandle,
    owned: bool,
}

impl Drop for Array {
    fn drop(&mut self) {
        if self.owned && !self.handle.is_null() {
            // SAFETY: an owned, live handle of this host.
            unsafe { (self.host.t().release)(self.host.raw, self.handle) }
        }
    }
}

impl Clone for Array {
    fn clone(&self) -> Self {
        self.retain().expect("mlxd host: retain failed")
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Array({:?}, {:?})", self.shape(), self.dtype())
    }
}

/// Axis sizes as the host takes them.
fn dims(shape: &[i32]) -> (*const i32, i32) {
    (shape.as_ptr(), shape.len() as i32)
}

impl Host {
    /// Wraps the pointer the host passed in.
    ///
    /// # Safety
    /// `raw` must be the host pointer of the current call.
    pub unsafe fn from_raw(raw: *const sys::Host) -> Host {
        Host { raw }
    }

    /// The raw table (for operations newer than this crate, after checking `struct_size`).
    pub fn raw(&self) -> *const sys::Host {
        self.raw
    }

    fn t(&self) -> &sys::Host {
        // SAFETY: the host keeps the table alive for the instance's lifetime.
        unsafe { &*self.raw }
    }

    /// The host's message for its last failed operation.
    pub fn last_error(&self) -> String {
        // SAFETY: the host returns a NUL-terminated string valid until the next operation.
        let p = unsafe { (self.t().last_error)(self.raw) };
        if p.is_null() {
            return String::new();
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Takes ownership of an operation's result.
    pub fn own(&self, handle: ArrayHandle) -> Result<Array, Error> {
        if handle.is_null() {
            return Err(Error::host(self.last_error()));
        }
        Ok(Array { host: *self, handle, owned: true })
    }

    /// A non-owning view of a handle the host lent for this call.
    ///
    /// # Safety
    /// `handle` must be a live handle of this host, valid for as long as the view is used.
    pub unsafe fn borrow(&self, handle: ArrayHandle) -> Array {
        Array { host: *self, handle, owned: false }
    }

    /// A 0-d array.
    pub fn scalar(&self, value: f64, dtype: Dtype) -> Result<Array, Error> {
        self.own(unsafe { (self.t().scalar)(self.raw, value, dtype as i32) })
    }

    /// A float32 scalar.
    pub fn f32(&self, value: f32) -> Result<Array, Error> {
        self.scalar(value as f64, Dtype::Float32)
    }

    /// An int32 scalar.
    pub fn i32(&self, value: i32) -> Result<Array, Error> {
        self.scalar(value as f64, Dtype::Int32)
    }

    /// Copies host values to the device.
    pub fn from_slice<T: Element>(&self, data: &[T], shape: &[i32]) -> Result<Array, Error> {
        let n: i64 = shape.iter().map(|&d| d as i64).product();
        if n != data.len() as i64 {
            return Err(Error::shape(format!("from_slice: {} values for shape {shape:?}", data.len())));
        }
        let (s, nd) = dims(shape);
        self.own(unsafe { (self.t().from_data)(self.raw, data.as_ptr() as *const c_void, s, nd, T::DTYPE as i32) })
    }

    /// An array of `shape` filled with `value`.
    pub fn full(&self, shape: &[i32], value: f64, dtype: Dtype) -> Result<Array, Error> {
        let (s, nd) = dims(shape);
        self.own(unsafe { (self.t().full)(self.raw, s, nd, value, dtype as i32) })
    }

    /// `[start, stop)` by `step`.
    pub fn arange(&self, start: f64, stop: f64, step: f64, dtype: Dtype) -> Result<Array, Error> {
        self.own(unsafe { (self.t().arange)(self.raw, start, stop, step, dtype as i32) })
    }

    /// `cond ? a : b`, broadcasting.
    pub fn select(&self, cond: &Array, a: &Array, b: &Array) -> Result<Array, Error> {
        self.own(unsafe { (self.t().r#where)(self.raw, cond.handle, a.handle, b.handle) })
    }

    /// Joins arrays along `axis`.
    pub fn concatenate(&self, arrays: &[&Array], axis: i32) -> Result<Array, Error> {
        let handles: Vec<ArrayHandle> = arrays.iter().map(|a| a.handle).collect();
        self.own(unsafe { (self.t().concatenate)(self.raw, handles.as_ptr(), handles.len() as i32, axis) })
    }

    /// `[num, 2]` keys derived from `key`.
    pub fn random_split(&self, key: &Array, num: i32) -> Result<Array, Error> {
        self.own(unsafe { (self.t().random_split)(self.raw, key.handle, num) })
    }

    /// Uniform in `[0, 1)`.
    pub fn random_uniform(&self, key: &Array, shape: &[i32], dtype: Dtype) -> Result<Array, Error> {
        let (s, nd) = dims(shape);
        self.own(unsafe { (self.t().random_uniform)(self.raw, key.handle, s, nd, dtype as i32) })
    }

    /// Standard normal.
    pub fn random_normal(&self, key: &Array, shape: &[i32], dtype: Dtype) -> Result<Array, Error> {
        let (s, nd) = dims(shape);
        self.own(unsafe { (self.t().random_normal)(self.raw, key.handle, s, nd, dtype as i32) })
    }

    /// Standard Gumbel.
    pub fn random_gumbel(&self, key: &Array, shape: &[i32], dtype: Dtype) -> Result<Array, Error> {
        let (s, nd) = dims(shape);
        self.own(unsafe { (self.t().random_gumbel)(self.raw, key.handle, s, nd, dtype as i32) })
    }

    /// One index drawn from `softmax(logits)` along `axis`.
    pub fn random_categorical(&self, key: &Array, logits: &Array, axis: i32) -> Result<Array, Error> {
        self.own(unsafe { (self.t().random_categorical)(self.raw, key.handle, logits.handle, axis) })
    }

    /// The language [`Host::kernel`] compiles here (ABI 1.1).
    pub fn kernel_language(&self) -> KernelLanguage {
        match unsafe { (self.t().kernel_language)(self.raw) } {
            sys::KERNEL_CUDA => KernelLanguage::Cuda,
            _ => KernelLanguage::None,
        }
    }

    /// Queues `kernel` on `inputs` (ABI 1.1): one output per `(shape, dtype)` of `outputs`,
    /// `grid` threads along x, y, z in blocks of `block` threads. See the header's "Kernels".
    pub fn kernel(
        &self,
        kernel: &Kernel,
        inputs: &[&Array],
        outputs: &[(&[i32], Dtype)],
        grid: [i32; 3],
        block: [i32; 3],
    ) -> Result<Vec<Array>, Error> {
        if inputs.len() != kernel.inputs.len() || outputs.len() != kernel.outputs.len() {
            return Err(Error::shape(format!(
                "kernel {:?}: {} inputs and {} outputs given for {} and {} names",
                kernel.name,
                inputs.len(),
                outputs.len(),
                kernel.inputs.len(),
                kernel.outputs.len()
            )));
        }
        let names = |n: &[&'static CStr]| n.iter().map(|c| c.as_ptr()).collect::<Vec<_>>();
        let (input_names, output_names) = (names(kernel.inputs), names(kernel.outputs));
        let raw = sys::Kernel {
            struct_size: std::mem::size_of::<sys::Kernel>(),
            name: kernel.name.as_ptr(),
            header: kernel.header.map_or(std::ptr::null(), CStr::as_ptr),
            source: kernel.source.as_ptr(),
            n_inputs: input_names.len() as i32,
            input_names: input_names.as_ptr(),
            n_outputs: output_names.len() as i32,
            output_names: output_names.as_ptr(),
        };
        let handles: Vec<ArrayHandle> = inputs.iter().map(|a| a.handle).collect();
        let shapes: Vec<i32> = outputs.iter().flat_map(|(s, _)| s.iter().copied()).collect();
        let ndims: Vec<i32> = outputs.iter().map(|(s, _)| s.len() as i32).collect();
        let dtypes: Vec<i32> = outputs.iter().map(|(_, d)| *d as i32).collect();
        let launch = sys::KernelLaunch {
            struct_size: std::mem::size_of::<sys::KernelLaunch>(),
            inputs: handles.as_ptr(),
            output_shapes: shapes.as_ptr(),
            output_ndims: ndims.as_ptr(),
            output_dtypes: dtypes.as_ptr(),
            grid,
            block,
        };
        let mut out = vec![std::ptr::null_mut(); outputs.len()];
        // SAFETY: every pointer is valid for the call; the host writes `outputs.len()` handles.
        let n = unsafe { (self.t().kernel)(self.raw, &raw, &launch, out.as_mut_ptr()) };
        if n != outputs.len() as i32 {
            return Err(Error::host(self.last_error()));
        }
        out.into_iter().map(|h| self.own(h)).collect()
    }
}

/// The language of [`Host::kernel`]'s bodies on this host (`mlxd_kernel_language`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelLanguage {
    /// No kernels here (the CPU): use operations.
    None,
    /// CUDA bodies (MLX on an NVIDIA GPU).
    Cuda,
}

/// A kernel (`mlxd_kernel`): its name, code and parameter names, all static. The header's
/// "Kernels" section says what `source` sees.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// 1-64 of `[A-Za-z0-9_]`.
    pub name: &'static CStr,
    /// Device code before the kernel.
    pub header: Option<&'static CStr>,
    /// The kernel's body.
    pub source: &'static CStr,
    /// One identifier per input, in order.
    pub inputs: &'static [&'static CStr],
    /// One identifier per output, in order.
    pub outputs: &'static [&'static CStr],
}

macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident = $code:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> Result<Array, Error> { self.unary($code) }
    )*};
}

macro_rules! binary {
    ($($(#[$doc:meta])* $name:ident = $code:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self, other: &Array) -> Result<Array, Error> { self.binary($code, other) }
    )*};
}

macro_rules! reduce {
    ($($(#[$doc:meta])* $name:ident = $code:expr;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self, axis: i32, keepdims: bool) -> Result<Array, Error> { self.reduce($code, axis, keepdims) }
    )*};
}

impl Array {
    fn t(&self) -> &sys::Host {
        self.host.t()
    }

    fn h(&self) -> *const sys::Host {
        self.host.raw
    }

    /// The raw handle (still owned by this value).
    pub fn handle(&self) -> ArrayHandle {
        self.handle
    }

    /// Gives up ownership of the handle, e.g. to return it from `apply`.
    pub fn into_raw(self) -> ArrayHandle {
        let handle = self.handle;
        std::mem::forget(self);
        handle
    }

    /// The host this array belongs to.
    pub fn host(&self) -> Host {
        self.host
    }

    /// A new owned handle to the same array.
    pub fn retain(&self) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().retain)(self.h(), self.handle) })
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> i32 {
        unsafe { (self.t().ndim)(self.h(), self.handle) }
    }

    /// Size of one dimension (negative axes count from the end).
    pub fn dim(&self, axis: i32) -> i32 {
        unsafe { (self.t().dim)(self.h(), self.handle, axis) }
    }

    /// All dimensions.
    pub fn shape(&self) -> Vec<i32> {
        (0..self.ndim().max(0)).map(|a| self.dim(a)).collect()
    }

    /// Element type (`None` for a type this ABI does not name).
    pub fn dtype(&self) -> Option<Dtype> {
        Dtype::from_code(unsafe { (self.t().dtype)(self.h(), self.handle) })
    }

    /// Number of elements.
    pub fn size(&self) -> i64 {
        unsafe { (self.t().size)(self.h(), self.handle) }
    }

    /// An elementwise operation by code (`MLXD_NEG`...).
    pub fn unary(&self, op: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().unary)(self.h(), op, self.handle) })
    }

    /// A broadcasting binary operation by code (`MLXD_ADD`...).
    pub fn binary(&self, op: i32, other: &Array) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().binary)(self.h(), op, self.handle, other.handle) })
    }

    /// A reduction over `axis` by code (`MLXD_SUM`...).
    pub fn reduce(&self, op: i32, axis: i32, keepdims: bool) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().reduce)(self.h(), op, self.handle, axis, keepdims as i32) })
    }

    unary! {
        /// `-x`.
        neg = 0;
        /// `|x|`.
        abs = 1;
        /// `e^x`.
        exp = 2;
        /// `ln x`.
        log = 3;
        /// `ln(1 + x)`.
        log1p = 4;
        /// `√x`.
        sqrt = 5;
        /// `x²`.
        square = 6;
        /// Rounds down.
        floor = 7;
        /// Rounds up.
        ceil = 8;
        /// `1 / (1 + e^-x)`.
        sigmoid = 9;
        /// Hyperbolic tangent.
        tanh = 10;
        /// Boolean not.
        logical_not = 11;
        /// NaN test.
        is_nan = 12;
        /// ±inf test.
        is_inf = 13;
        /// Finite test.
        is_finite = 14;
        /// `1 / x`.
        reciprocal = 15;
    }

    binary! {
        /// `a + b`.
        add = 0;
        /// `a - b`.
        sub = 1;
        /// `a * b`.
        mul = 2;
        /// `a / b`.
        div = 3;
        /// `a ^ b`.
        pow = 4;
        /// Elementwise maximum.
        maximum = 5;
        /// Elementwise minimum.
        minimum = 6;
        /// Remainder.
        rem = 7;
        /// Floor division.
        floor_div = 8;
        /// `ln(e^a + e^b)`.
        logaddexp = 9;
        /// `a == b`.
        eq = 10;
        /// `a != b`.
        ne = 11;
        /// `a < b`.
        lt = 12;
        /// `a <= b`.
        le = 13;
        /// `a > b`.
        gt = 14;
        /// `a >= b`.
        ge = 15;
        /// Boolean and.
        logical_and = 16;
        /// Boolean or.
        logical_or = 17;
    }

    reduce! {
        /// Sum over an axis.
        sum = 0;
        /// Maximum over an axis.
        max = 1;
        /// Minimum over an axis.
        min = 2;
        /// Product over an axis.
        prod = 3;
        /// Mean over an axis.
        mean = 4;
        /// Any true over an axis.
        any = 5;
        /// All true over an axis.
        all = 6;
        /// `ln Σ e^x` over an axis.
        logsumexp = 7;
        /// Index of the maximum (uint32).
        argmax = 8;
        /// Index of the minimum (uint32).
        argmin = 9;
    }

    /// Converted to `dtype`.
    pub fn astype(&self, dtype: Dtype) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().astype)(self.h(), self.handle, dtype as i32) })
    }

    /// Softmax along `axis`.
    pub fn softmax(&self, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().softmax)(self.h(), self.handle, axis) })
    }

    fn cumulative(&self, op: i32, axis: i32, reverse: bool, inclusive: bool) -> Result<Array, Error> {
        self.host
            .own(unsafe { (self.t().cumulative)(self.h(), op, self.handle, axis, reverse as i32, inclusive as i32) })
    }

    /// Running sum along `axis`.
    pub fn cumsum(&self, axis: i32, reverse: bool, inclusive: bool) -> Result<Array, Error> {
        self.cumulative(0, axis, reverse, inclusive)
    }

    /// Running product along `axis`.
    pub fn cumprod(&self, axis: i32, reverse: bool, inclusive: bool) -> Result<Array, Error> {
        self.cumulative(1, axis, reverse, inclusive)
    }

    /// Running maximum along `axis`.
    pub fn cummax(&self, axis: i32, reverse: bool, inclusive: bool) -> Result<Array, Error> {
        self.cumulative(2, axis, reverse, inclusive)
    }

    /// Running minimum along `axis`.
    pub fn cummin(&self, axis: i32, reverse: bool, inclusive: bool) -> Result<Array, Error> {
        self.cumulative(3, axis, reverse, inclusive)
    }

    /// Ascending sort.
    pub fn sort(&self, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().sort)(self.h(), self.handle, axis) })
    }

    /// Indices of the ascending sort (uint32).
    pub fn argsort(&self, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().argsort)(self.h(), self.handle, axis) })
    }

    /// Indices partitioned around rank `kth` (uint32).
    pub fn argpartition(&self, kth: i32, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().argpartition)(self.h(), self.handle, kth, axis) })
    }

    /// The `k` largest values, unordered.
    pub fn topk(&self, k: i32, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().topk)(self.h(), self.handle, k, axis) })
    }

    /// Elements at `indices` along `axis`.
    pub fn take(&self, indices: &Array, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().take)(self.h(), self.handle, indices.handle, axis) })
    }

    /// NumPy's `take_along_axis`.
    pub fn take_along_axis(&self, indices: &Array, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().take_along_axis)(self.h(), self.handle, indices.handle, axis) })
    }

    /// NumPy's `put_along_axis`, as a new array.
    pub fn put_along_axis(&self, indices: &Array, values: &Array, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().put_along_axis)(self.h(), self.handle, indices.handle, values.handle, axis) })
    }

    /// `put_along_axis` where repeated indices combine by `mode`.
    pub fn scatter(&self, mode: ScatterMode, indices: &Array, updates: &Array, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe {
            (self.t().scatter)(self.h(), mode as i32, self.handle, indices.handle, updates.handle, axis)
        })
    }

    /// Same elements, new shape.
    pub fn reshape(&self, shape: &[i32]) -> Result<Array, Error> {
        let (s, nd) = dims(shape);
        self.host.own(unsafe { (self.t().reshape)(self.h(), self.handle, s, nd) })
    }

    /// `a[start:stop:step]` along `axis`.
    pub fn slice(&self, axis: i32, start: i32, stop: i32, step: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().slice)(self.h(), self.handle, axis, start, stop, step) })
    }

    /// Broadcast to `shape`.
    pub fn broadcast_to(&self, shape: &[i32]) -> Result<Array, Error> {
        let (s, nd) = dims(shape);
        self.host.own(unsafe { (self.t().broadcast_to)(self.h(), self.handle, s, nd) })
    }

    /// A new axis of size 1.
    pub fn expand_dims(&self, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().expand_dims)(self.h(), self.handle, axis) })
    }

    /// Removes an axis of size 1.
    pub fn squeeze(&self, axis: i32) -> Result<Array, Error> {
        self.host.own(unsafe { (self.t().squeeze)(self.h(), self.handle, axis) })
    }
}
