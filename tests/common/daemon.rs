//! The real daemon binary for integration tests: started on port 0 with a private state
//! directory and the default model, and a raw WebSocket client for it.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// A client connection.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A running `mlxd serve`; killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The bearer token it created.
    pub token: String,
    /// Holds config and state; removed when dropped.
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the daemon; `extra` is appended to a config whose `[server]` table is open.
pub fn start(extra: &str) -> Daemon {
    start_in(tempfile::tempdir().unwrap(), extra)
}

/// [`start`] in a directory the caller prepared (its `state/` is the daemon's state directory).
pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Daemon {
    let state = dir.path().join("state");
    let config = dir.path().join("config.toml");
    let text = format!("[server]\nlisten = \"127.0.0.1:0\"\nstate_dir = {:?}\n{extra}", state.display().to_string());
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mlxd"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("MLXD_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("mlxd starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("mlxd listening on ws://")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .to_string();
    let token = std::fs::read_to_string(state.join("token")).unwrap().trim().to_string();
    Daemon { child, addr, token, dir }
}

/// Connects with an optional token and `Origin`; returns the socket and the daemon's hello.
pub async fn connect_with(d: &Daemon, token: Option<&str>, origin: Option<&str>) -> Result<(Ws, Value), WsError> {
    let mut req = format!("ws://{}/", d.addr).into_client_request().unwrap();
    if let Some(t) = token {
        req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let hello = recv(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    assert_eq!(hello["protocol"], 1, "{hello}");
    Ok((ws, hello))
}

/// Sends one JSON message.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON message (`{"type":"closed"}` once the server closed the socket).
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(120), ws.next()).await.expect("an event within 120 s");
        match m.expect("stream open").expect("frame") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(_) => return serde_json::json!({"type": "closed"}),
            _ => continue,
        }
    }
}

/// Asserts that the default model really decoded rows together: its `status` reports a mean
/// batch above one.
pub async fn assert_batched(ws: &mut Ws) {
    send(ws, serde_json::json!({"type": "status", "id": "s"})).await;
    let s = recv(ws).await;
    assert!(s["data"]["resident_models"][0]["mean_batch"].as_f64().unwrap() > 1.0, "{s}");
}

/// Connects with the daemon's token.
pub async fn connect(d: &Daemon) -> Ws {
    connect_with(d, Some(&d.token), None).await.expect("connects with the token").0
}

/// Sends a request and returns the first message that carries its id.
pub async fn ask(ws: &mut Ws, v: Value) -> Value {
    let id = v["id"].clone();
    send(ws, v).await;
    loop {
        let m = recv(ws).await;
        if m["id"] == id || m["type"] == "closed" {
            return m;
        }
    }
}

/// One generation's events, as a client sees them.
#[derive(Debug, Default, Clone)]
pub struct Finished {
    /// Whether `started` came.
    pub started: bool,
    /// The concatenated token texts.
    pub text: String,
    /// The token ids.
    pub ids: Vec<u64>,
    /// The `done` or `error` event.
    pub last: Value,
}

impl Finished {
    /// `done` with this finish reason, or `error` with this code: `"done:stop"`, `"error:internal"`.
    pub fn outcome(&self) -> String {
        match self.last["type"].as_str() {
            Some("done") => format!("done:{}", self.last["finish_reason"].as_str().unwrap_or("?")),
            Some("error") => format!("error:{}", self.last["code"].as_str().unwrap_or("?")),
            _ => format!("{}", self.last),
        }
    }
}

/// Reads until every generation in `ids` has its final event; panics on a second final event,
/// on events after the final one's arrival for an id, or on events for other ids.
pub async fn finish(ws: &mut Ws, ids: &[&str]) -> std::collections::HashMap<String, Finished> {
    let mut out: std::collections::HashMap<String, Finished> = std::collections::HashMap::new();
    let mut open: std::collections::HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    while !open.is_empty() {
        let m = recv(ws).await;
        assert_ne!(m["type"], "closed", "the connection closed with {open:?} unfinished");
        let id = m["id"].as_str().unwrap_or_default().to_string();
        assert!(ids.contains(&id.as_str()), "event for an unexpected id: {m}");
        assert!(open.contains(&id), "event after the final one: {m}");
        let f = out.entry(id.clone()).or_default();
        match m["type"].as_str().unwrap() {
            "started" => f.started = true,
            "token" => {
                f.text.push_str(m["text"].as_str().unwrap());
                f.ids.extend(m["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()));
            }
            "done" | "error" => {
                f.last = m;
                open.remove(&id);
            }
            other => panic!("unexpected event {other}: {m}"),
        }
    }
    out
}

/// The process's resident set size, bytes (Linux `/proc`).
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

/// A `kB` field of the process's `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in bytes; 0 when
/// it cannot be read.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
