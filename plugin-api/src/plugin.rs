//! The [`Plugin`] trait and [`export_plugin!`](crate::export_plugin): a type implementing the
//! trait becomes a complete plugin, with a static descriptor and vtable, every entry point
//! wrapped in `catch_unwind` (a panic becomes `MLXD_ERR_PANIC` with its message), the host's
//! struct size and ABI version checked, and results handed over with the ownership the header
//! specifies.

use crate::array::{Array, Host};
use crate::sys;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a plugin's `apply` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// New logits `[B, V]`.
    Processor,
    /// Token ids `[B]`; replaces the built-in filters and pick.
    Sampler,
}

impl Kind {
    /// The `mlxd_kind` code.
    pub const fn code(self) -> i32 {
        match self {
            Kind::Processor => sys::KIND_PROCESSOR,
            Kind::Sampler => sys::KIND_SAMPLER,
        }
    }
}

/// An error code with a message, returned across the boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// An `mlxd_status` code (`sys::ERR_*`).
    pub code: sys::Status,
    /// What went wrong.
    pub message: String,
}

impl Error {
    /// Invalid parameters (`MLXD_ERR_PARAMS`).
    pub fn params(message: impl Into<String>) -> Error {
        Error { code: sys::ERR_PARAMS, message: message.into() }
    }

    /// An input of the wrong shape or dtype (`MLXD_ERR_SHAPE`).
    pub fn shape(message: impl Into<String>) -> Error {
        Error { code: sys::ERR_SHAPE, message: message.into() }
    }

    /// A failed host operation (`MLXD_ERR_HOST`).
    pub fn host(message: impl Into<String>) -> Error {
        Error { code: sys::ERR_HOST, message: message.into() }
    }

    /// Anything else (`MLXD_ERR_INTERNAL`).
    pub fn internal(message: impl Into<String>) -> Error {
        Error { code: sys::ERR_INTERNAL, message: message.into() }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// `create`'s arguments.
pub struct CreateArgs<'a> {
    /// The request's params for this plugin: a JSON object (`"{}"` when absent).
    pub params_json: &'a str,
    /// The model's vocabulary size V.
    pub vocab_size: i32,
    /// Rows B of every `apply`.
    pub batch: i32,
}

/// `apply`'s context: the sequence's history and this call's random key, when the descriptor
/// asked for them.
pub struct Context {
    /// `[B, T]` int32 prompt + generated tokens (with [`sys::CAP_HISTORY`]).
    pub tokens: Option<Array>,
    /// How many of T are the prompt.
    pub prompt_tokens: i64,
    /// How many were generated.
    pub generated_tokens: i64,
    /// A fresh `[2]` uint32 key (with [`sys::CAP_RANDOM`]).
    pub key: Option<Array>,
    /// The request's temperature.
    pub temperature: f32,
    /// V.
    pub vocab_size: i32,
}

/// A sampler plugin: one value per sequence. Export it with
/// [`export_plugin!`](crate::export_plugin).
pub trait Plugin: Sized + 'static {
    /// What requests call it: 1-64 of `[a-z0-9_-]`.
    const NAME: &'static CStr;
    /// The plugin's own version.
    const VERSION: &'static CStr;
    /// Processor or final sampler.
    const KIND: Kind;
    /// `sys::CAP_*` flags: what the context must hold.
    const CAPABILITIES: u64 = 0;
    /// JSON Schema of the params object, shown to clients.
    const PARAMS_SCHEMA: Option<&'static CStr> = None;
    /// One line for listings.
    const DESCRIPTION: Option<&'static CStr> = None;
    /// Set to true when [`Plugin::accept`] is implemented (otherwise the host never calls it).
    const WANTS_ACCEPT: bool = false;

    /// Validates the params and makes one sequence's state.
    fn create(host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error>;

    /// Builds this step's output lazily: logits `[B, V]` for a processor, ids `[B]` for a
    /// sampler. `logits` is borrowed (return `logits.retain()` to pass it through).
    fn apply(&mut self, host: &Host, logits: &Array, ctx: &Context) -> Result<Array, Error>;

    /// Sees the tokens chosen this step (`[B]` uint32, borrowed).
    fn accept(&mut self, _host: &Host, _token: &Array) -> Result<(), Error> {
        Ok(())
    }
}

/// Writes `message` into the host's buffer (truncated at a character boundary).
fn write_error(err: *mut sys::ErrorBuf, message: &str) {
    // SAFETY: the host passes a valid buffer or null.
    let Some(buf) = (unsafe { err.as_mut() }) else { return };
    if buf.message.is_null() || buf.capacity == 0 {
        return;
    }
    let mut n = message.len().min(buf.capacity - 1);
    while !message.is_char_boundary(n) {
        n -= 1;
    }
    unsafe {
        std::ptr::copy_nonoverlapping(message.as_ptr(), buf.message as *mut u8, n);
        *buf.message.add(n) = 0;
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    format!("panicked: {what}")
}

/// Runs `f`, turning errors and panics into a status code and a message.
fn guarded(err: *mut sys::ErrorBuf, f: impl FnOnce() -> Result<(), Error>) -> sys::Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => sys::OK,
        Ok(Err(e)) => {
            write_error(err, &e.message);
            if e.code == sys::OK { sys::ERR_INTERNAL } else { e.code }
        }
        Err(p) => {
            write_error(err, &panic_message(p));
            sys::ERR_PANIC
        }
    }
}

/// Checks that the host's table has every operation this crate calls.
fn check_host(host: *const sys::Host) -> Result<Host, Error> {
    // SAFETY: the host passes its table.
    let t = unsafe { host.as_ref() }.ok_or_else(|| Error::internal("null host table"))?;
    if t.abi_major != sys::ABI_MAJOR || t.struct_size < std::mem::size_of::<sys::Host>() {
        return Err(Error::internal(format!(
            "host ABI {}.{} with a {}-byte op table; this plugin needs {}.{} and {} bytes",
            t.abi_major,
            t.abi_minor,
            t.struct_size,
            sys::ABI_MAJOR,
            sys::ABI_MINOR,
            std::mem::size_of::<sys::Host>()
        )));
    }
    Ok(unsafe { Host::from_raw(host) })
}

/// `create` for `P`.
///
/// # Safety
/// Called by the host with the header's arguments.
pub unsafe extern "C" fn create<P: Plugin>(
    host: *const sys::Host,
    args: *const sys::CreateArgs,
    state: *mut *mut c_void,
    err: *mut sys::ErrorBuf,
) -> sys::Status {
    guarded(err, || {
        let host = check_host(host)?;
        let args = unsafe { args.as_ref() }.ok_or_else(|| Error::internal("null create args"))?;
        let json = if args.params_json.is_null() {
            "{}"
        } else {
            unsafe { CStr::from_ptr(args.params_json) }.to_str().map_err(|_| Error::params("params are not UTF-8"))?
        };
        let view = CreateArgs { params_json: json, vocab_size: args.vocab_size, batch: args.batch };
        let plugin = P::create(&host, &view)?;
        unsafe { *state = Box::into_raw(Box::new(plugin)) as *mut c_void };
        Ok(())
    })
}

/// `apply` for `P`.
///
/// # Safety
/// Called by the host with the header's arguments.
pub unsafe extern "C" fn apply<P: Plugin>(
    state: *mut c_void,
    host: *const sys::Host,
    logits: sys::ArrayHandle,
    ctx: *const sys::Context,
    out: *mut sys::ArrayHandle,
    err: *mut sys::ErrorBuf,
) -> sys::Status {
    guarded(err, || {
        let host = unsafe { Host::from_raw(host) };
        let plugin = unsafe { (state as *mut P).as_mut() }.ok_or_else(|| Error::internal("null state"))?;
        let c = unsafe { ctx.as_ref() }.ok_or_else(|| Error::internal("null context"))?;
        let borrowed = |h: sys::ArrayHandle| (!h.is_null()).then(|| unsafe { host.borrow(h) });
        let context = Context {
            tokens: borrowed(c.tokens),
            prompt_tokens: c.prompt_tokens,
            generated_tokens: c.generated_tokens,
            key: borrowed(c.key),
            temperature: c.temperature,
            vocab_size: c.vocab_size,
        };
        let logits = unsafe { host.borrow(logits) };
        let result = plugin.apply(&host, &logits, &context)?;
        unsafe { *out = result.into_raw() };
        Ok(())
    })
}

/// `accept` for `P`.
///
/// # Safety
/// Called by the host with the header's arguments.
pub unsafe extern "C" fn accept<P: Plugin>(
    state: *mut c_void,
    host: *const sys::Host,
    token: sys::ArrayHandle,
    err: *mut sys::ErrorBuf,
) -> sys::Status {
    guarded(err, || {
        let host = unsafe { Host::from_raw(host) };
        let plugin = unsafe { (state as *mut P).as_mut() }.ok_or_else(|| Error::internal("null state"))?;
        let token = unsafe { host.borrow(token) };
        plugin.accept(&host, &token)
    })
}

/// `destroy` for `P`: drops the state (and with it every array it holds).
///
/// # Safety
/// Called by the host once per successful create.
pub unsafe extern "C" fn destroy<P: Plugin>(state: *mut c_void, _host: *const sys::Host) {
    if state.is_null() {
        return;
    }
    // A panicking Drop must not unwind into the host; the state is lost either way.
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(state as *mut P) })));
}

/// The vtable of `P` (used by [`export_plugin!`](crate::export_plugin)).
pub const fn vtable<P: Plugin>() -> sys::VTable {
    sys::VTable {
        struct_size: std::mem::size_of::<sys::VTable>(),
        create: Some(create::<P>),
        apply: Some(apply::<P>),
        accept: if P::WANTS_ACCEPT { Some(accept::<P>) } else { None },
        destroy: Some(destroy::<P>),
    }
}

const fn ptr_or_null(s: Option<&'static CStr>) -> *const c_char {
    match s {
        Some(s) => s.as_ptr(),
        None => std::ptr::null(),
    }
}

/// The descriptor of `P` (used by [`export_plugin!`](crate::export_plugin)).
pub const fn descriptor<P: Plugin>(vtable: &'static sys::StaticVTable) -> sys::Descriptor {
    sys::Descriptor {
        struct_size: std::mem::size_of::<sys::Descriptor>(),
        abi_major: sys::ABI_MAJOR,
        abi_minor: sys::ABI_MINOR,
        name: P::NAME.as_ptr(),
        version: P::VERSION.as_ptr(),
        kind: P::KIND.code(),
        capabilities: P::CAPABILITIES,
        params_schema: ptr_or_null(P::PARAMS_SCHEMA),
        description: ptr_or_null(P::DESCRIPTION),
        vtable: &vtable.0,
    }
}

/// Exports a [`Plugin`] type as this library's plugin: defines the static descriptor and the
/// `mlxd_sampler_plugin_v1` entry function. Use it once per library (a `cdylib`).
///
/// ```ignore
/// mlxd_plugin_api::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        static MLXD_PLUGIN_VTABLE: $crate::sys::StaticVTable = $crate::sys::StaticVTable($crate::vtable::<$plugin>());
        static MLXD_PLUGIN_DESCRIPTOR: $crate::sys::StaticDescriptor =
            $crate::sys::StaticDescriptor($crate::descriptor::<$plugin>(&MLXD_PLUGIN_VTABLE));

        /// The plugin's entry function (see `mlxd_sampler.h`).
        #[no_mangle]
        pub extern "C" fn mlxd_sampler_plugin_v1() -> *const $crate::sys::Descriptor {
            &MLXD_PLUGIN_DESCRIPTOR.0
        }
    };
}
