//! `mlxd-plugin-api`: write mlxd sampler plugins in Rust.
//!
//! A plugin is a `cdylib` that exports one function, `mlxd_sampler_plugin_v1`, returning a
//! descriptor; the daemon loads it from the directories in its `config.toml` and calls it per
//! sequence, per decode step. The plugin never links MLX: it builds lazy device computations
//! through the host's table of operations on opaque array handles. The C header
//! `include/mlxd_sampler.h` is the specification; this crate mirrors it ([`sys`]) and adds:
//!
//! - [`Host`] and [`Array`]: safe wrappers of the operation table. Arrays release their handle
//!   when dropped; every operation returns `Result<Array, Error>`.
//! - [`Plugin`]: implement `create` and `apply` (and `accept` if the plugin keeps state that
//!   depends on the chosen token).
//! - [`export_plugin!`]: builds the static descriptor and vtable, and wraps every entry point so
//!   that no panic crosses the boundary (it becomes `MLXD_ERR_PANIC` with its message).
//!
//! ```ignore
//! use mlxd_plugin_api::{export_plugin, Array, Context, CreateArgs, Error, Host, Kind, Plugin};
//!
//! /// Divides every logit by a fixed `scale` (a processor).
//! struct Scale { scale: Array }
//!
//! impl Plugin for Scale {
//!     const NAME: &'static std::ffi::CStr = c"scale";
//!     const VERSION: &'static std::ffi::CStr = c"0.1.0";
//!     const KIND: Kind = Kind::Processor;
//!
//!     fn create(host: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
//!         let scale: f32 = args.params_json.trim_matches(|c| "{} ".contains(c))
//!             .strip_prefix("\"scale\":").and_then(|v| v.trim().parse().ok()).unwrap_or(1.0);
//!         Ok(Scale { scale: host.f32(scale)? })
//!     }
//!
//!     fn apply(&mut self, _host: &Host, logits: &Array, _ctx: &Context) -> Result<Array, Error> {
//!         logits.div(&self.scale)
//!     }
//! }
//!
//! export_plugin!(Scale);
//! ```
//!
//! # Layout
//! - [`sys`]: the header's types, `#[repr(C)]`.
//! - `array`: [`Host`], [`Array`], [`Dtype`], [`ScatterMode`], [`Kernel`] (ABI 1.1: a plugin's
//!   own CUDA kernel, one launch instead of many operations).
//! - `plugin`: [`Plugin`], [`Error`], [`Kind`], the entry-point trampolines and
//!   [`export_plugin!`].
#![deny(missing_docs)]

mod array;
mod plugin;
pub mod sys;

pub use array::{Array, Dtype, Element, Host, Kernel, KernelLanguage, ScatterMode};
pub use plugin::{accept, apply, create, descriptor, destroy, vtable, Context, CreateArgs, Error, Kind, Plugin};

/// The C header, for tools that install it next to a plugin's sources.
pub const HEADER: &str = include_str!("../include/mlxd_sampler.h");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_and_the_crate_agree_on_versions_and_codes() {
        let define = |name: &str| -> String {
            let line = HEADER
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} is not defined in the header"));
            line.split_whitespace().nth(2).unwrap().trim_matches('"').to_string()
        };
        assert_eq!(define("MLXD_SAMPLER_ABI_MAJOR"), sys::ABI_MAJOR.to_string());
        assert_eq!(define("MLXD_SAMPLER_ABI_MINOR"), sys::ABI_MINOR.to_string());
        assert_eq!(format!("{}\0", define("MLXD_SAMPLER_ENTRY_SYMBOL")).as_bytes(), sys::ENTRY_SYMBOL);
        assert_eq!(define("MLXD_KIND_PROCESSOR"), sys::KIND_PROCESSOR.to_string());
        assert_eq!(define("MLXD_KIND_SAMPLER"), sys::KIND_SAMPLER.to_string());
        assert_eq!(define("MLXD_ERR_PANIC"), sys::ERR_PANIC.to_string());
        for (name, d) in [("MLXD_BOOL", Dtype::Bool), ("MLXD_INT32", Dtype::Int32), ("MLXD_FLOAT32", Dtype::Float32)] {
            assert_eq!(define(name), (d as i32).to_string(), "{name}");
        }
        // Every operation of the Rust table appears in the C struct, in the same order.
        let c_ops: Vec<&str> = HEADER
            .lines()
            .filter_map(|l| l.trim_start().split("(*").nth(1))
            .filter_map(|rest| rest.split(')').next())
            .collect();
        let host_ops = &c_ops[..c_ops.iter().position(|&n| n == "create").unwrap()];
        assert_eq!(host_ops.len(), 39, "{host_ops:?}");
        assert_eq!(host_ops[0], "last_error");
        assert_eq!(host_ops[36..], ["random_categorical", "kernel_language", "kernel"]);
        assert_eq!(define("MLXD_KERNEL_NONE"), sys::KERNEL_NONE.to_string());
        assert_eq!(define("MLXD_KERNEL_CUDA"), sys::KERNEL_CUDA.to_string());
    }

    struct Boom;
    impl Plugin for Boom {
        const NAME: &'static std::ffi::CStr = c"boom";
        const VERSION: &'static std::ffi::CStr = c"0";
        const KIND: Kind = Kind::Processor;
        fn create(_: &Host, args: &CreateArgs<'_>) -> Result<Self, Error> {
            match args.params_json {
                "\"panic\"" => panic!("on purpose"),
                "\"error\"" => Err(Error::params("`x` must be positive, got -1 — with a long tail")),
                _ => Ok(Boom),
            }
        }
        fn apply(&mut self, _: &Host, logits: &Array, _: &Context) -> Result<Array, Error> {
            logits.retain()
        }
    }

    /// Calls the generated `create` with a fake host table (never used: `create` fails first).
    fn call_create(params: &std::ffi::CStr, cap: usize) -> (sys::Status, String) {
        let mut table: std::mem::MaybeUninit<sys::Host> = std::mem::MaybeUninit::zeroed();
        unsafe {
            let t = table.as_mut_ptr();
            (*t).struct_size = std::mem::size_of::<sys::Host>();
            (*t).abi_major = sys::ABI_MAJOR;
        }
        let args = sys::CreateArgs {
            struct_size: std::mem::size_of::<sys::CreateArgs>(),
            params_json: params.as_ptr(),
            params_len: params.to_bytes().len(),
            vocab_size: 10,
            batch: 1,
        };
        let mut buf = vec![0 as std::ffi::c_char; cap];
        let mut err = sys::ErrorBuf { message: buf.as_mut_ptr(), capacity: cap };
        let mut state = std::ptr::null_mut();
        let code = unsafe { create::<Boom>(table.as_ptr(), &args, &mut state, &mut err) };
        let msg = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        if !state.is_null() {
            unsafe { destroy::<Boom>(state, table.as_ptr()) };
        }
        (code, msg)
    }

    #[test]
    fn errors_and_panics_become_codes_with_messages() {
        let (code, msg) = call_create(c"\"error\"", 256);
        assert_eq!((code, msg.as_str()), (sys::ERR_PARAMS, "`x` must be positive, got -1 — with a long tail"));
        let (code, msg) = call_create(c"\"panic\"", 256);
        assert_eq!((code, msg.as_str()), (sys::ERR_PANIC, "panicked: on purpose"));
        // Truncated at a character boundary, NUL-terminated within the capacity.
        let (code, msg) = call_create(c"\"error\"", 32);
        assert_eq!(code, sys::ERR_PARAMS);
        assert_eq!(msg, "`x` must be positive, got -1 ");
        let (code, _) = call_create(c"{}", 8);
        assert_eq!(code, sys::OK);
    }

    #[test]
    fn the_descriptor_describes_the_type() {
        static VT: sys::StaticVTable = sys::StaticVTable(vtable::<Boom>());
        let d = descriptor::<Boom>(&VT);
        assert_eq!((d.abi_major, d.abi_minor, d.kind), (sys::ABI_MAJOR, sys::ABI_MINOR, sys::KIND_PROCESSOR));
        assert_eq!(d.struct_size, std::mem::size_of::<sys::Descriptor>());
        assert!(d.params_schema.is_null());
        assert!(VT.0.accept.is_none(), "no accept unless WANTS_ACCEPT");
        assert_eq!(unsafe { std::ffi::CStr::from_ptr(d.name) }, c"boom");
    }
}
