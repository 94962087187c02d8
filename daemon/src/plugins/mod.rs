//! Sampler plugins, host side: loading shared libraries from the configured directories,
//! listing and reloading them, and running one plugin instance per sequence.
//!
//! The ABI is `plugin-api/include/mlxd_sampler.h` (mirrored by the `mlxd-plugin-api` crate,
//! whose `#[repr(C)]` types this module uses). Plugins never link MLX: they call the operation
//! table of [`host`], which runs MLX operations on this process's arrays.
//!
//! Where plugins run in the sampling pipeline is documented in [`crate::sampling`]; how a
//! failing plugin fails only its own request is in [`instance`] and `sampling::plugin`.
//!
//! # Layout
//! - [`loader`]: opening and checking one library.
//! - [`registry`]: the catalog of loaded plugins, its listing, reload.
//! - `host`: the per-instance handle table the operation table works on.
//! - `ops`: the operations (`extern "C"` functions over MLX).
//! - [`kernels`]: ABI 1.1's `kernel` operation, a plugin's own CUDA kernel as one node.
//! - [`instance`]: one plugin instance of one sequence: create, apply, accept, destroy.

pub mod instance;
pub mod loader;
pub mod registry;

pub(crate) mod host;
pub mod kernels;
mod ops;

pub use instance::PluginInstance;
pub use registry::{Catalog, PluginRegistry, Refused};

use mlxd_plugin_api::sys;
use std::path::PathBuf;
use std::sync::Arc;

/// What a plugin's `apply` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// New logits; runs after the built-in penalties, before temperature and filters.
    Processor,
    /// Token ids; replaces temperature-filters-pick.
    Sampler,
}

/// A loaded, checked plugin library. Requests hold it through an `Arc`, so the library stays
/// mapped until the last sequence using it is done, whatever reloads happen meanwhile.
pub struct Plugin {
    /// What requests call it.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// Processor or final sampler.
    pub kind: Kind,
    /// `sys::CAP_*` flags.
    pub capabilities: u64,
    /// Its parameters' JSON Schema.
    pub schema: Option<serde_json::Value>,
    /// One line for listings.
    pub description: Option<String>,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// The ABI version it was built against.
    pub abi: (u32, u32),
    pub(crate) create: sys::CreateFn,
    pub(crate) apply: sys::ApplyFn,
    pub(crate) accept: Option<sys::AcceptFn>,
    pub(crate) destroy: Option<sys::DestroyFn>,
    /// Last field: dropped after everything that points into it.
    pub(crate) _library: libloading::Library,
}

impl Plugin {
    /// Whether `apply` reads the token history.
    pub fn wants_history(&self) -> bool {
        self.capabilities & sys::CAP_HISTORY != 0
    }

    /// Whether `apply` reads a random key.
    pub fn wants_random(&self) -> bool {
        self.capabilities & sys::CAP_RANDOM != 0
    }

    /// Whether a processor's `apply` takes the logits in their own float dtype (otherwise the
    /// host converts them to float32 first).
    pub fn takes_model_dtype(&self) -> bool {
        self.capabilities & sys::CAP_MODEL_DTYPE != 0
    }

    /// The listing entry.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "description": self.description,
            "params_schema": self.schema,
            "capabilities": {
                "history": self.wants_history(),
                "random": self.wants_random(),
                "model_dtype": self.takes_model_dtype(),
            },
            "abi": format!("{}.{}", self.abi.0, self.abi.1),
            "file": self.file.display().to_string(),
        })
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plugin({} {} {:?} from {})", self.name, self.version, self.kind, self.file.display())
    }
}

/// One use of a plugin by a request: the plugin and its parameters (JSON object text).
#[derive(Debug, Clone)]
pub struct PluginRequest {
    /// The loaded plugin.
    pub plugin: Arc<Plugin>,
    /// Parameters for its `create`, as JSON text.
    pub params: String,
}

impl PartialEq for PluginRequest {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.plugin, &other.plugin) && self.params == other.params
    }
}

/// A plugin failed: it refused its parameters, returned an error code, panicked (caught by its
/// helper), or returned an output of the wrong shape. Fails only the request using it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("plugin `{plugin}`: {message}")]
pub struct PluginError {
    /// The plugin's name.
    pub plugin: String,
    /// What went wrong.
    pub message: String,
}
