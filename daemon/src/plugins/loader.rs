//! Opening one plugin library and checking everything about it before any of its code but the
//! entry function runs: the symbol, the descriptor's size, the ABI version (same major, host
//! minor >= plugin minor), the name, the kind, the vtable's size and required entries, and the
//! parameter schema's JSON.
//!
//! Each load opens a private copy of the file, so a library rebuilt in place is picked up by the
//! next reload even while requests still run on the old one (the dynamic loader would otherwise
//! hand back the already-open library of the same path).

use super::{Kind, Plugin};
use mlxd_plugin_api::sys;
use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of the descriptor fields ABI 1.0 defines.
const DESCRIPTOR_V1: usize = std::mem::size_of::<sys::Descriptor>();
/// Size of the vtable fields ABI 1.0 defines.
const VTABLE_V1: usize = std::mem::size_of::<sys::VTable>();

/// Whether `path` looks like a shared library of this platform.
pub fn is_library(path: &Path) -> bool {
    let ext = if cfg!(target_os = "macos") { "dylib" } else if cfg!(windows) { "dll" } else { "so" };
    path.is_file() && path.extension().is_some_and(|e| e == ext)
}

fn text(p: *const c_char) -> Option<String> {
    // SAFETY: the descriptor's strings are NUL-terminated static data of the library.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A private copy of `path` to open (removed again once opened).
fn private_copy(path: &Path) -> std::io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("mlxd-plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let copy = dir.join(format!("{}-{name}", SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::copy(path, &copy)?;
    Ok(copy)
}

/// Opens and checks one library; the error names the file and what is wrong with it.
pub fn load(path: &Path) -> Result<Plugin, String> {
    let file = path.display();
    let copy = private_copy(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    // SAFETY: loading runs the library's initializers; plugins are trusted code from the
    // directories the operator configured, never from a client.
    let opened = unsafe { libloading::Library::new(&copy) };
    let _ = std::fs::remove_file(&copy);
    let library = opened.map_err(|e| format!("{file}: cannot load: {e}"))?;
    let entry: sys::EntryFn = match unsafe { library.get::<sys::EntryFn>(sys::ENTRY_SYMBOL) } {
        Ok(f) => *f,
        Err(_) => return Err(format!("{file}: exports no `mlxd_sampler_plugin_v1` function (not an mlxd sampler plugin)")),
    };
    // SAFETY: the entry function takes nothing and returns a static descriptor.
    let d = unsafe { entry() };
    if d.is_null() {
        return Err(format!("{file}: mlxd_sampler_plugin_v1 returned NULL"));
    }
    // The first three fields are stable across every version: read them before the rest.
    // SAFETY: a descriptor starts with struct_size, abi_major, abi_minor in every version.
    let (size, major, minor) = unsafe { ((*d).struct_size, (*d).abi_major, (*d).abi_minor) };
    let host = format!("{}.{}", sys::ABI_MAJOR, sys::ABI_MINOR);
    if major != sys::ABI_MAJOR || minor > sys::ABI_MINOR {
        return Err(format!(
            "{file}: built for plugin ABI {major}.{minor}, but this mlxd speaks ABI {host} \
             (a plugin loads when its major equals the host's and its minor is not above the host's)"
        ));
    }
    if size < DESCRIPTOR_V1 {
        return Err(format!("{file}: its descriptor is {size} bytes; ABI {major}.{minor} defines {DESCRIPTOR_V1}"));
    }
    // SAFETY: at least DESCRIPTOR_V1 bytes of a version this host understands.
    let d = unsafe { &*d };
    let name = text(d.name).unwrap_or_default();
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_') {
        return Err(format!("{file}: plugin name {name:?} must be 1-64 of [a-z0-9_-]"));
    }
    let kind = match d.kind {
        sys::KIND_PROCESSOR => Kind::Processor,
        sys::KIND_SAMPLER => Kind::Sampler,
        other => return Err(format!("{file}: plugin `{name}` has unknown kind {other}")),
    };
    if d.vtable.is_null() {
        return Err(format!("{file}: plugin `{name}` has no vtable"));
    }
    // SAFETY: non-null, static.
    let vt = unsafe { &*d.vtable };
    if vt.struct_size < VTABLE_V1 {
        return Err(format!("{file}: plugin `{name}`'s vtable is {} bytes; ABI {host} defines {VTABLE_V1}", vt.struct_size));
    }
    let (Some(create), Some(apply)) = (vt.create, vt.apply) else {
        return Err(format!("{file}: plugin `{name}` lacks `create` or `apply` (both are required)"));
    };
    let schema = match text(d.params_schema) {
        None => None,
        Some(s) => Some(
            serde_json::from_str::<serde_json::Value>(&s)
                .map_err(|e| format!("{file}: plugin `{name}`'s parameter schema is not JSON: {e}"))?,
        ),
    };
    Ok(Plugin {
        name,
        version: text(d.version).unwrap_or_default(),
        kind,
        capabilities: d.capabilities,
        schema,
        description: text(d.description),
        file: path.to_path_buf(),
        abi: (major, minor),
        create,
        apply,
        accept: vt.accept,
        destroy: vt.destroy,
        _library: library,
    })
}
