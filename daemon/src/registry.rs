//! Model residency: which configured models are loaded, loading on first use, unloading after
//! their keep-alive, and a device-memory budget that is never exceeded (idle models are evicted
//! least recently used first; otherwise the load is refused with a clear error).
//!
//! A watchdog ([`Registry::watchdog`], run every second by the server) sets aside a model whose
//! thread has been inside one admission or decode step for longer than `engine.step_timeout_s`
//! (a sampler plugin that never returns): the model leaves the resident set, so the next request
//! loads a fresh copy on a new thread; the requests that were in flight on it fail with
//! `internal` (their connections wait on [`WorkerStats::stalled`]); and the weights it still holds
//! count against the budget until the stuck thread comes back and ends, if it ever does.

use crate::config::{Config, ModelConfig};
use crate::engine::worker::{self, WorkerHandle, WorkerLimits, WorkerStats};
use crate::engine::{Engine, EngineOptions};
use crate::protocol::ErrorCode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A loaded model.
struct Resident {
    handle: WorkerHandle,
    bytes: u64,
    last_used: Instant,
    loaded_at: Instant,
}

/// Shared registry of configured and resident models.
pub struct Registry {
    config: Arc<Config>,
    resident: Mutex<HashMap<String, Resident>>,
    /// One load at a time per model (and a cheap wait for whoever asks meanwhile).
    loading: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Model threads, joined at shutdown: a thread still releasing MLX state while the process
    /// exits would race MLX's static destructors.
    threads: Mutex<Vec<(Arc<WorkerStats>, std::thread::JoinHandle<()>)>>,
    /// Models the watchdog set aside, with the bytes their threads may still hold.
    stalled: Mutex<Vec<Stalled>>,
    budget: u64,
}

/// A model thread the watchdog gave up on.
struct Stalled {
    name: String,
    bytes: u64,
    stats: Arc<WorkerStats>,
}

/// Why a model is not available.
#[derive(Debug, Clone)]
pub struct RegistryError {
    /// Stable code.
    pub code: ErrorCode,
    /// What to tell the client.
    pub message: String,
}

impl RegistryError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError { code, message: message.into() }
    }
}

impl Registry {
    /// A registry over `config.models`; nothing is loaded yet.
    pub fn new(config: Arc<Config>) -> Self {
        let budget = match config.engine.memory_budget_mb {
            0 => (mlx_rs::memory::memory_limit().unwrap_or(8 << 30) as f64 * 0.9) as u64,
            mb => (mb as u64) << 20,
        };
        Registry {
            config,
            resident: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
            threads: Mutex::default(),
            stalled: Mutex::default(),
            budget,
        }
    }

    /// The memory budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Resolves `name` (or the default model) and returns its handle, loading it if needed.
    pub async fn get(&self, name: Option<&str>) -> Result<(String, WorkerHandle), RegistryError> {
        let name = name.unwrap_or_else(|| self.config.default_model()).to_string();
        let Some(mc) = self.config.models.get(&name).cloned() else {
            let known: Vec<&str> = self.config.models.keys().map(String::as_str).collect();
            return Err(RegistryError::new(ErrorCode::UnknownModel, format!("no model named `{name}` (configured: {})", known.join(", "))));
        };
        if let Some(h) = self.touch(&name) {
            return Ok((name, h));
        }
        let gate = self.loading.lock().expect("registry lock").entry(name.clone()).or_default().clone();
        let _guard = gate.lock().await;
        if let Some(h) = self.touch(&name) {
            return Ok((name, h));
        }
        let handle = self.load(&name, &mc).await?;
        Ok((name, handle))
    }

    fn touch(&self, name: &str) -> Option<WorkerHandle> {
        let mut r = self.resident.lock().expect("registry lock");
        r.get_mut(name).map(|m| {
            m.last_used = Instant::now();
            m.handle.clone()
        })
    }

    async fn load(&self, name: &str, mc: &ModelConfig) -> Result<WorkerHandle, RegistryError> {
        let path = resolve_path(&mc.path).map_err(|e| RegistryError::new(ErrorCode::ModelLoadFailed, format!("model `{name}`: {e}")))?;
        let need = estimate_bytes(&path);
        self.make_room(name, need)?;
        let slow = self.config.server.slow_client_timeout_s;
        let limits = WorkerLimits {
            max_batch: self.config.limits.max_batch,
            max_queue: self.config.limits.max_queue,
            slow_client_timeout: (slow > 0).then(|| Duration::from_secs(slow)),
        };
        let options = EngineOptions {
            prefill_chunk: self.config.engine.prefill_chunk,
            prompt_cache_bytes: self.config.engine.prompt_cache_mb << 20,
            ..Default::default()
        };
        let model_name = name.to_string();
        let load_path = path.clone();
        tracing::info!(model = name, path = %path.display(), bytes = need, "loading model");
        let started = Instant::now();
        let spawned = tokio::task::spawn_blocking(move || {
            worker::spawn(&model_name, limits, move || {
                let loaded = crate::models::load(&load_path)?;
                Ok(Engine::new(loaded, options))
            })
        })
        .await
        .map_err(|e| RegistryError::new(ErrorCode::Internal, format!("model loader crashed: {e}")))?;
        let (handle, join) = spawned
            .map_err(|e| RegistryError::new(ErrorCode::ModelLoadFailed, format!("model `{name}` ({}): {e}", path.display())))?;
        tracing::info!(model = name, ms = started.elapsed().as_millis() as u64, "model loaded");
        self.threads.lock().expect("registry lock").push((handle.stats.clone(), join));
        // The file size was an estimate (a CPU load may expand quantized weights): count what
        // was loaded, and make room again or give the model back if it does not fit.
        let actual = handle.stats.weight_bytes.load(std::sync::atomic::Ordering::SeqCst).max(need);
        if actual > need {
            self.make_room(name, actual)?;
        }
        let now = Instant::now();
        let mut r = self.resident.lock().expect("registry lock");
        r.insert(name.to_string(), Resident { handle: handle.clone(), bytes: actual, last_used: now, loaded_at: now });
        self.share_kv(&r);
        Ok(handle)
    }

    /// Evicts idle models, least recently used first, until `need` more bytes fit the budget.
    fn make_room(&self, name: &str, need: u64) -> Result<(), RegistryError> {
        let mut r = self.resident.lock().expect("registry lock");
        let held_by_stalled = self.held_by_stalled();
        loop {
            let used: u64 = r.values().map(|m| m.bytes).sum::<u64>() + held_by_stalled;
            if used + need <= self.budget {
                return Ok(());
            }
            let victim = r.iter().filter(|(_, m)| m.handle.in_flight() == 0).min_by_key(|(_, m)| m.last_used).map(|(n, _)| n.clone());
            match victim {
                Some(v) => {
                    tracing::info!(evicted = %v, for_model = name, "unloading idle model to stay within the memory budget");
                    r.remove(&v);
                    self.share_kv(&r);
                }
                None => {
                    return Err(RegistryError::new(
                        ErrorCode::OutOfMemory,
                        format!(
                            "model `{name}` needs about {} MiB; {} MiB of the {} MiB budget (engine.memory_budget_mb) are held by busy models{}",
                            need >> 20,
                            used >> 20,
                            self.budget >> 20,
                            if held_by_stalled > 0 {
                                format!(" ({} MiB by stalled model threads, see engine.step_timeout_s)", held_by_stalled >> 20)
                            } else {
                                String::new()
                            }
                        ),
                    ))
                }
            }
        }
    }

    /// Unloads `name` unless it is generating.
    pub fn unload(&self, name: &str) -> Result<bool, RegistryError> {
        if !self.config.models.contains_key(name) {
            return Err(RegistryError::new(ErrorCode::UnknownModel, format!("no model named `{name}`")));
        }
        let mut r = self.resident.lock().expect("registry lock");
        match r.get(name) {
            None => Ok(false),
            Some(m) if m.handle.in_flight() > 0 => {
                Err(RegistryError::new(ErrorCode::Busy, format!("model `{name}` has {} requests in flight", m.handle.in_flight())))
            }
            Some(_) => {
                r.remove(name);
                self.share_kv(&r);
                Ok(true)
            }
        }
    }

    /// Unloads models idle for longer than their `keep_alive_s`.
    pub fn reap_idle(&self) {
        let mut r = self.resident.lock().expect("registry lock");
        let now = Instant::now();
        r.retain(|name, m| {
            let keep = self.config.models.get(name).map_or(0, |c| c.keep_alive_s);
            let idle = m.handle.in_flight() == 0 && now.duration_since(m.last_used) > Duration::from_secs(keep);
            if keep > 0 && idle {
                tracing::info!(model = %name, "unloading after keep-alive");
                return false;
            }
            true
        });
        self.share_kv(&r);
    }

    /// Bytes still held by threads the watchdog gave up on (forgetting those that have ended).
    fn held_by_stalled(&self) -> u64 {
        let mut s = self.stalled.lock().expect("registry lock");
        s.retain(|z| !z.stats.has_exited());
        s.iter().map(|z| z.bytes).sum()
    }

    /// Sets aside every resident model whose thread has been inside one admission or decode
    /// step for longer than `engine.step_timeout_s` (0 disables the watchdog): its in-flight
    /// requests fail, and the next request for it loads a fresh copy. Returns the names.
    pub fn watchdog(&self) -> Vec<String> {
        let limit = self.config.engine.step_timeout_s;
        if limit == 0 {
            return Vec::new();
        }
        let mut r = self.resident.lock().expect("registry lock");
        let stuck: Vec<String> =
            r.iter().filter(|(_, m)| m.handle.stats.stalled_for() > Duration::from_secs(limit)).map(|(n, _)| n.clone()).collect();
        for name in &stuck {
            let m = r.remove(name).expect("listed above");
            tracing::error!(
                model = %name,
                stalled_s = m.handle.stats.stalled_for().as_secs(),
                "model thread stuck in one step for longer than engine.step_timeout_s (a sampler plugin that never returns?); \
                 its requests fail and the model loads again on the next request"
            );
            m.handle.stats.mark_stalled();
            self.stalled.lock().expect("registry lock").push(Stalled { name: name.clone(), bytes: m.bytes, stats: m.handle.stats.clone() });
        }
        if !stuck.is_empty() {
            self.share_kv(&r);
        }
        stuck
    }

    /// Models set aside by the watchdog whose threads have not ended yet.
    pub fn stalled_models(&self) -> Vec<String> {
        let mut s = self.stalled.lock().expect("registry lock");
        s.retain(|z| !z.stats.has_exited());
        s.iter().map(|z| z.name.clone()).collect()
    }

    /// What the budget leaves after the resident weights is split evenly between the resident
    /// models' KV caches; each model thread reserves against its share before admitting a
    /// sequence (prompt + max_tokens positions), so weights plus caches stay within the budget.
    fn share_kv(&self, r: &HashMap<String, Resident>) {
        if r.is_empty() {
            return;
        }
        let weights: u64 = r.values().map(|m| m.bytes).sum::<u64>() + self.held_by_stalled();
        let share = self.budget.saturating_sub(weights) / r.len() as u64;
        for m in r.values() {
            m.handle.stats.kv_limit.store(share, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Loads every model marked `preload`.
    pub async fn preload(&self) -> Result<(), RegistryError> {
        for (name, mc) in &self.config.models {
            if mc.preload {
                self.get(Some(name)).await?;
            }
        }
        Ok(())
    }

    /// Handles of every resident model (for shutdown and metrics).
    pub fn resident(&self) -> Vec<(String, WorkerHandle)> {
        self.resident.lock().expect("registry lock").iter().map(|(n, m)| (n.clone(), m.handle.clone())).collect()
    }

    /// Drops every resident model and waits for the model threads to finish. Call once no
    /// connection holds a model handle any more (their channels must close for threads to end).
    /// Threads the watchdog gave up on are not waited for: they may never come back.
    pub fn unload_all(&self) {
        self.resident.lock().expect("registry lock").clear();
        let threads = std::mem::take(&mut *self.threads.lock().expect("registry lock"));
        let (stuck, threads): (Vec<_>, Vec<_>) = threads.into_iter().partition(|(s, t)| s.is_stalled() && !t.is_finished());
        if !stuck.is_empty() {
            tracing::warn!(threads = stuck.len(), "not waiting for model threads stuck in a step (engine.step_timeout_s)");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads.iter().any(|(_, t)| !t.is_finished()) {
            if Instant::now() > deadline {
                tracing::warn!("model threads still busy after 10 s; exiting anyway");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for (_, t) in threads {
            let _ = t.join();
        }
    }

    /// The `models` listing.
    pub fn listing(&self) -> Value {
        let r = self.resident.lock().expect("registry lock");
        let models: Vec<Value> = self
            .config
            .models
            .iter()
            .map(|(name, mc)| {
                let res = r.get(name);
                json!({
                    "name": name,
                    "path": mc.path,
                    "loaded": res.is_some(),
                    "default": name == self.config.default_model(),
                    "bytes": res.map(|m| m.bytes),
                    "loaded_for_s": res.map(|m| m.loaded_at.elapsed().as_secs()),
                    "in_flight": res.map(|m| m.handle.in_flight()),
                    "keep_alive_s": mc.keep_alive_s,
                })
            })
            .collect();
        json!({ "models": models, "memory_budget_bytes": self.budget })
    }
}

/// `"default"` means the bundled default model; anything else is a path (with `~` expanded).
fn resolve_path(p: &str) -> Result<PathBuf, String> {
    if p == "default" {
        return crate::default_model::ensure().map_err(|e| e.to_string());
    }
    let path = match p.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(rest),
        None => PathBuf::from(p),
    };
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    Ok(path)
}

/// Weight bytes on disk: the device footprint of the weights, near enough for a budget.
fn estimate_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}
