//! The `epsilon` sampler plugin is written in plain C (`epsilon.c`, against
//! `plugin-api/include/mlxd_sampler.h` only) to prove the ABI is language-neutral. This crate
//! exists so that `cargo build` / `cargo test` compile it with the `cc` crate's C compiler;
//! [`LIBRARY`] is the built shared library, ready to copy into a `[plugins] dirs` folder.

/// Path of the built `libmlxd_epsilon.so` (`.dylib` on macOS).
pub const LIBRARY: &str = env!("MLXD_EPSILON_LIB");

#[cfg(test)]
mod tests {
    use mlxd_plugin_api::sys;
    use std::ffi::CStr;

    #[test]
    fn the_c_library_exports_a_valid_descriptor() {
        let lib = unsafe { libloading::Library::new(super::LIBRARY) }.expect("the C plugin loads");
        let entry: libloading::Symbol<sys::EntryFn> = unsafe { lib.get(sys::ENTRY_SYMBOL) }.expect("entry symbol");
        let d = unsafe { &*entry() };
        assert_eq!(d.struct_size, std::mem::size_of::<sys::Descriptor>(), "C and Rust agree on the layout");
        assert_eq!((d.abi_major, d.abi_minor, d.kind), (sys::ABI_MAJOR, sys::ABI_MINOR, sys::KIND_PROCESSOR));
        assert_eq!(unsafe { CStr::from_ptr(d.name) }, c"epsilon");
        let schema = unsafe { CStr::from_ptr(d.params_schema) }.to_str().unwrap();
        assert!(schema.contains("\"epsilon\""), "{schema}");
        let vt = unsafe { &*d.vtable };
        assert_eq!(vt.struct_size, std::mem::size_of::<sys::VTable>());
        assert!(vt.create.is_some() && vt.apply.is_some() && vt.accept.is_none() && vt.destroy.is_some());
    }
}
