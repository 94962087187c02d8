//! Where the daemon listens and which token it wants, found without flags.
//!
//! Order: `MLXD_URL` / `MLXD_TOKEN` from the environment; otherwise the `endpoint` file the
//! daemon writes into its state directory on start, and the `token` file beside it; otherwise
//! `ws://127.0.0.1:7878`.

use crate::Error;
use std::path::PathBuf;

/// Address and credentials of a daemon.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ws://host:port/`.
    pub url: String,
    /// Bearer token, if the daemon wants one.
    pub token: Option<String>,
}

/// The daemon's default state directory (the same rule the daemon uses).
pub fn default_state_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    if cfg!(target_os = "macos") {
        return home.join("Library/Application Support/mlxd");
    }
    std::env::var_os("XDG_STATE_HOME").map(|d| PathBuf::from(d).join("mlxd")).unwrap_or_else(|| home.join(".local/state/mlxd"))
}

impl Endpoint {
    /// Finds the running daemon (see the module header). `MLXD_STATE_DIR` overrides the state
    /// directory.
    pub fn discover() -> Result<Endpoint, Error> {
        let state = std::env::var_os("MLXD_STATE_DIR").map(PathBuf::from).unwrap_or_else(default_state_dir);
        let url = match std::env::var("MLXD_URL") {
            Ok(u) => u,
            Err(_) => std::fs::read_to_string(state.join("endpoint"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "ws://127.0.0.1:7878/".to_string()),
        };
        let token = match std::env::var("MLXD_TOKEN") {
            Ok(t) => Some(t),
            Err(_) => match std::fs::read_to_string(state.join("token")) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(Error::Config(format!("cannot read {}: {e}", state.join("token").display()))),
            },
        };
        Ok(Endpoint { url, token })
    }
}
