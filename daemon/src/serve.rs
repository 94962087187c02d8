//! `mlxd serve`: configuration, logging, the token, signals, and the server's lifetime.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::server::{self, Shared};
use std::path::PathBuf;
use std::sync::Arc;

/// Options from the command line.
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// `--config PATH`.
    pub config: Option<PathBuf>,
    /// `--listen ADDR:PORT` (overrides the file).
    pub listen: Option<String>,
    /// `--log-json`.
    pub log_json: bool,
}

/// The config file used when none is given: `$XDG_CONFIG_HOME/mlxd/config.toml` or
/// `~/.config/mlxd/config.toml`, if it exists.
pub fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let p = base.join("mlxd/config.toml");
    p.is_file().then_some(p)
}

/// Loads the configuration `opts` point at.
pub fn load_config(opts: &ServeOptions) -> anyhow::Result<Config> {
    let mut cfg = match opts.config.clone().or_else(default_config_path) {
        Some(p) => Config::load(&p)?,
        None => Config::default(),
    };
    if let Some(l) = &opts.listen {
        cfg.server.listen = l.clone();
        cfg.validate(std::path::Path::new("--listen"))?;
    }
    Ok(cfg)
}

/// Logs to stderr, filtered by `MLXD_LOG` (or `RUST_LOG`), default `info`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MLXD_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Runs the daemon until SIGTERM or ctrl-c; returns after every request got its final event.
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let token = if cfg.server.auth {
        let dir = cfg.state_dir();
        let t = crate::auth::load_or_create(&dir)
            .map_err(|e| anyhow::anyhow!("token file in {}: {e}", dir.display()))?;
        Some(t)
    } else {
        tracing::warn!("server.auth = false: any local process can use this daemon");
        None
    };
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (server.listen): {e}", cfg.server.listen))?;
    let addr = listener.local_addr()?;
    // One configured model: its fused decode kernel may take the whole GPU (models::fused).
    crate::models::fused::set_one_model(cfg.models.len() == 1);
    let registry = Arc::new(Registry::new(cfg.clone()));
    let plugins = Arc::new(crate::plugins::PluginRegistry::new(cfg.plugins.dirs.clone()));
    let (shutdown_tx, _) = tokio::sync::broadcast::channel(1);
    let shared = Arc::new(Shared {
        config: cfg.clone(),
        registry: registry.clone(),
        plugins: plugins.clone(),
        token,
        metrics: Arc::new(Metrics::default()),
        shutdown: shutdown_tx,
    });
    // Clients find the daemon through this file (mlxd_client::Endpoint::discover).
    let state = cfg.state_dir();
    if std::fs::create_dir_all(&state).and_then(|_| std::fs::write(state.join("endpoint"), format!("ws://{addr}/\n"))).is_err() {
        tracing::warn!(dir = %state.display(), "cannot write the endpoint file; clients need MLXD_URL");
    }
    // Machine-readable first line: tests and clients wait for it.
    println!("mlxd listening on ws://{addr}");
    tracing::info!(%addr, token_file = %crate::auth::token_path(&cfg.state_dir()).display(), "ready");
    let preload = {
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = registry.preload().await {
                tracing::error!(code = ?e.code, "preloading failed: {}", e.message);
            }
        })
    };
    let reloader = tokio::spawn(reload_on_sighup(plugins));
    server::run(listener, shared, shutdown_signal()).await;
    reloader.abort();
    preload.abort();
    let _ = preload.await;
    // `shared` (and every connection's handle) is gone: the model threads can finish and join.
    tokio::task::spawn_blocking(move || registry.unload_all()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP rescans the plugin directories (the `reload_plugins` message does the same).
async fn reload_on_sighup(plugins: Arc<crate::plugins::PluginRegistry>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload plugins with the `reload_plugins` message");
            return;
        };
        while hup.recv().await.is_some() {
            let plugins = plugins.clone();
            let _ = tokio::task::spawn_blocking(move || plugins.reload()).await;
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
