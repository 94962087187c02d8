//! The listener: accepts TCP (and optionally Unix-socket) connections, answers the plain HTTP
//! paths (`/metrics`, `/health`, and the OpenAI-compatible `/v1/...` of [`crate::openai`]) and
//! upgrades the rest to WebSocket after checking the bearer token and the browser `Origin`. Each
//! WebSocket connection then runs in [`crate::connection`].
//!
//! `run(listener, shutdown)` returns once shutdown was signalled and every connection has sent
//! its final events (mini-redis's pattern: a broadcast notice and a wait for every task).

use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Everything connections share.
pub struct Shared {
    /// The configuration.
    pub config: Arc<Config>,
    /// Models.
    pub registry: Arc<Registry>,
    /// Sampler plugins (from `[plugins] dirs`).
    pub plugins: Arc<crate::plugins::PluginRegistry>,
    /// The bearer token (None when `server.auth = false`).
    pub token: Option<String>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Fires once when the server stops.
    pub shutdown: broadcast::Sender<()>,
}

/// Serves `listener` (and the Unix socket, if configured) until `shutdown` resolves.
pub async fn run(listener: TcpListener, shared: Arc<Shared>, shutdown: impl std::future::Future<Output = ()>) {
    let limit = Arc::new(Semaphore::new(shared.config.server.max_connections));
    let mut tasks = JoinSet::new();
    #[cfg(unix)]
    let unix = match &shared.config.server.unix_socket {
        Some(path) => match bind_unix(path) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot listen on the Unix socket");
                None
            }
        },
        None => None,
    };
    let reaper = {
        let (registry, metrics) = (shared.registry.clone(), shared.metrics.clone());
        tokio::spawn(async move {
            // The watchdog every second; the keep-alive, and giving freed heap back to the
            // system once a burst of requests is over, every five.
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut trimmed_at = 0;
            for n in 0u64.. {
                tick.tick().await;
                let r = registry.clone();
                let requests = metrics.requests_total.load(std::sync::atomic::Ordering::Relaxed);
                let trim = n % 5 == 0 && requests != trimmed_at && r.resident().iter().all(|(_, h)| h.in_flight() == 0);
                if trim {
                    trimmed_at = requests;
                }
                let _ = tokio::task::spawn_blocking(move || {
                    r.watchdog();
                    if n % 5 == 0 {
                        r.reap_idle();
                    }
                    if trim {
                        release_free_heap();
                    }
                })
                .await;
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let accepted: Box<dyn Stream> = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    Box::new(s)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            r = accept_unix(&unix) => match r {
                Ok(s) => Box::new(s),
                Err(e) => {
                    tracing::warn!(error = %e, "unix accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            shared.metrics.refused_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tasks.spawn(refuse_busy(accepted));
            continue;
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            handle(accepted, shared).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    tracing::info!("shutting down: no new connections; finishing the running ones");
    let _ = shared.shutdown.send(());
    while tasks.join_next().await.is_some() {}
    reaper.abort();
    if let Some(path) = &shared.config.server.unix_socket {
        let _ = std::fs::remove_file(path);
    }
}

/// Returns the C heap's free pages to the system. glibc keeps what many threads freed (its
/// per-thread arenas and a raised mmap threshold), so after a burst of requests the process
/// would otherwise stay hundreds of MiB above its idle size (docs/reliability.md, soak test).
fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A byte stream a connection runs over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Reads the start of the stream without consuming it (TCP only; Unix sockets skip the
    /// plain-HTTP paths).
    fn peek_head<'a>(&'a self, _buf: &'a mut [u8]) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<usize>> + Send + 'a>> {
        Box::pin(async { Ok(0) })
    }
}

impl Stream for tokio::net::TcpStream {
    fn peek_head<'a>(&'a self, buf: &'a mut [u8]) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<usize>> + Send + 'a>> {
        Box::pin(self.peek(buf))
    }
}

#[cfg(unix)]
impl Stream for tokio::net::UnixStream {}

#[cfg(unix)]
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    // Created private (umask 177) rather than tightened after the fact, so there is no moment
    // in which another user sees a wider mode.
    // SAFETY: umask only swaps the process's file-creation mask; it is restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let l = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn accept_unix(l: &Option<tokio::net::UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn refuse_busy(mut s: Box<dyn Stream>) {
    let body = "{\"error\":\"busy\",\"message\":\"too many connections (server.max_connections)\"}";
    let resp = format!("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

async fn handle(stream: Box<dyn Stream>, shared: Arc<Shared>) {
    // Plain HTTP paths on the same port: look at the request line without consuming it.
    let mut head = [0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.peek_head(&mut head)).await.ok().and_then(|r| r.ok()).unwrap_or(0);
    let head = String::from_utf8_lossy(&head[..n]);
    let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
    if !upgrade {
        if crate::openai::handles(&head) {
            return crate::openai::serve(stream, shared).await;
        }
        if let Some(path) = head.strip_prefix("GET ").and_then(|r| r.split_whitespace().next()) {
            return serve_http(stream, path, &shared).await;
        }
    }
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(shared.config.server.max_frame_bytes))
        .max_frame_size(Some(shared.config.server.max_frame_bytes));
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> { check_handshake(req, resp, &shared) };
    let accepted = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(ws_config)),
    )
    .await;
    match accepted {
        Ok(Ok(ws)) => crate::connection::serve(ws, shared).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "handshake refused or failed"),
        Err(_) => tracing::debug!("handshake timed out"),
    }
}

fn reject(status: StatusCode, code: &str, message: &str) -> ErrorResponse {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    let mut resp = ErrorResponse::new(Some(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
    resp
}

/// Origin first (a browser page must not learn whether the token is right), then the token.
fn check_handshake(req: &Request, resp: Response, shared: &Shared) -> Result<Response, ErrorResponse> {
    if let Some(origin) = req.headers().get("origin") {
        let origin = origin.to_str().unwrap_or("");
        if !shared.config.server.allowed_origins.iter().any(|o| o == origin) {
            shared.metrics.refused_handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(reject(StatusCode::FORBIDDEN, "origin_not_allowed", &format!("origin {origin:?} is not in server.allowed_origins")));
        }
    }
    if let Some(expected) = &shared.token {
        let from_header = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let from_query = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        let ok = match from_header.or(from_query) {
            Some(given) => crate::auth::token_matches(expected, given),
            None => false,
        };
        if !ok {
            shared.metrics.refused_handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let why = if from_header.or(from_query).is_some() { "wrong token" } else { "missing token: send `Authorization: Bearer TOKEN` (the token file is in the state directory)" };
            return Err(reject(StatusCode::UNAUTHORIZED, "unauthorized", why));
        }
    }
    Ok(resp)
}

async fn serve_http(mut s: Box<dyn Stream>, path: &str, shared: &Shared) {
    // Drain the request head we peeked at, so the reply is not answered by a reset.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(100), tokio::io::AsyncReadExt::read(&mut s, &mut sink)).await;
    let (status, ctype, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", shared.metrics.render(&shared.registry)),
        "/health" => ("200 OK", "application/json", "{\"status\":\"ok\"}".to_string()),
        _ => ("404 Not Found", "application/json", "{\"error\":\"not_found\",\"message\":\"WebSocket clients connect to /; plain HTTP serves /metrics, /health and the OpenAI-compatible /v1/models, /v1/chat/completions, /v1/completions\"}".to_string()),
    };
    let resp = format!("HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}
