//! The catalog of loaded plugins: built by scanning `[plugins] dirs` (only those: a client can
//! name plugins, never paths), swapped whole on reload. A request resolves names against the
//! catalog of the moment and keeps `Arc`s to what it got, so a reload never pulls a library
//! from under a running sequence; the old catalog's libraries close when their last user ends.

use super::{loader, Kind, Plugin, PluginError, PluginRequest};
use crate::protocol::PluginUse;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// A file the loader refused, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refused {
    /// The file (or directory).
    pub file: String,
    /// Why, naming the file and, for version mismatches, both versions.
    pub error: String,
}

/// One scan's result.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Loaded plugins by name.
    pub plugins: BTreeMap<String, Arc<Plugin>>,
    /// Files that were not loaded.
    pub refused: Vec<Refused>,
    /// When the scan ran.
    pub loaded_at: Option<SystemTime>,
}

impl Catalog {
    /// Scans `dirs` in order (files sorted by name); the first plugin of a name wins.
    pub fn scan(dirs: &[PathBuf]) -> Catalog {
        let mut c = Catalog { loaded_at: Some(SystemTime::now()), ..Default::default() };
        for dir in dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) => {
                    c.refused.push(Refused { file: dir.display().to_string(), error: format!("{}: cannot read the directory: {e}", dir.display()) });
                    continue;
                }
            };
            let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| loader::is_library(p)).collect();
            files.sort();
            for file in files {
                match loader::load(&file) {
                    Ok(p) => match c.plugins.get(&p.name) {
                        Some(first) => c.refused.push(Refused {
                            file: file.display().to_string(),
                            error: format!("{}: plugin name `{}` is already provided by {}", file.display(), p.name, first.file.display()),
                        }),
                        None => {
                            tracing::info!(plugin = %p.name, version = %p.version, file = %file.display(), "sampler plugin loaded");
                            c.plugins.insert(p.name.clone(), Arc::new(p));
                        }
                    },
                    Err(error) => {
                        tracing::warn!("sampler plugin refused: {error}");
                        c.refused.push(Refused { file: file.display().to_string(), error });
                    }
                }
            }
        }
        c
    }
}

/// The live catalog and the directories it comes from.
pub struct PluginRegistry {
    dirs: Vec<PathBuf>,
    catalog: RwLock<Arc<Catalog>>,
}

impl PluginRegistry {
    /// Scans `dirs` now.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        let catalog = Catalog::scan(&dirs);
        PluginRegistry { dirs, catalog: RwLock::new(Arc::new(catalog)) }
    }

    /// The catalog of the moment.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().expect("plugin registry lock").clone()
    }

    /// Scans the directories again and swaps the catalog. Running requests keep what they use.
    pub fn reload(&self) -> Arc<Catalog> {
        let fresh = Arc::new(Catalog::scan(&self.dirs));
        *self.catalog.write().expect("plugin registry lock") = fresh.clone();
        tracing::info!(loaded = fresh.plugins.len(), refused = fresh.refused.len(), "sampler plugins reloaded");
        fresh
    }

    /// The `plugins` (and `reload_plugins`) answer.
    pub fn listing(&self) -> Value {
        let c = self.catalog();
        json!({
            "plugins": c.plugins.values().map(|p| p.describe()).collect::<Vec<_>>(),
            "refused": c.refused,
            "dirs": self.dirs,
            "abi": format!("{}.{}", mlxd_plugin_api::sys::ABI_MAJOR, mlxd_plugin_api::sys::ABI_MINOR),
        })
    }

    /// A loaded plugin by name; the error lists what is loaded and, when a refused file looks
    /// like the one meant, why it was refused.
    pub fn get(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let c = self.catalog();
        if let Some(p) = c.plugins.get(name) {
            return Ok(p.clone());
        }
        let loaded: Vec<&str> = c.plugins.keys().map(String::as_str).collect();
        let mut message = format!(
            "no sampler plugin named `{name}` is loaded (loaded: {})",
            if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") }
        );
        let wanted = name.replace('-', "_");
        if let Some(r) = c.refused.iter().find(|r| {
            Path::new(&r.file).file_stem().is_some_and(|s| s.to_string_lossy().replace('-', "_").contains(&wanted))
        }) {
            message.push_str(&format!("; refused at load: {}", r.error));
        }
        Err(PluginError { plugin: name.to_string(), message })
    }

    /// Resolves a request's `plugins` list: every name loaded, params an object (or absent).
    pub fn resolve(&self, uses: &[PluginUse]) -> Result<Vec<PluginRequest>, PluginError> {
        uses.iter()
            .map(|u| {
                let plugin = self.get(&u.name)?;
                let params = match &u.params {
                    Value::Null => "{}".to_string(),
                    v @ Value::Object(_) => v.to_string(),
                    _ => return Err(PluginError { plugin: u.name.clone(), message: "`params` must be a JSON object".into() }),
                };
                Ok(PluginRequest { plugin, params })
            })
            .collect()
    }
}

/// Checks how a request's plugins combine with its built-in sampling: at most one final
/// sampler, and no built-in filter it would silently replace.
pub fn check_combination(plugins: &[PluginRequest], s: &crate::sampling::SamplingParams) -> Result<(), PluginError> {
    let samplers: Vec<&str> = plugins.iter().filter(|p| p.plugin.kind == Kind::Sampler).map(|p| p.plugin.name.as_str()).collect();
    if samplers.len() > 1 {
        return Err(PluginError {
            plugin: samplers[1].to_string(),
            message: format!("a request may use one final sampler plugin, got {}", samplers.join(", ")),
        });
    }
    if let Some(name) = samplers.first() {
        let filters = [("top_k", s.top_k != 0), ("top_p", s.top_p < 1.0), ("min_p", s.min_p > 0.0), ("typical_p", s.typical_p < 1.0)];
        if let Some((field, _)) = filters.iter().find(|(_, on)| *on) {
            return Err(PluginError {
                plugin: name.to_string(),
                message: format!(
                    "`sampling.{field}` cannot be combined with final sampler plugin `{name}`: it replaces the built-in filters and pick"
                ),
            });
        }
    }
    Ok(())
}
