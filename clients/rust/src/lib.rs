//! Async client for mlxd's WebSocket protocol (`docs/protocol.md`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), mlxd_client::Error> {
//! let client = mlxd_client::Client::connect(&mlxd_client::Endpoint::discover()?).await?;
//! let mut stream = client.generate(mlxd_client::GenerateRequest::chat("What is the capital of France?")).await?;
//! while let Some(event) = stream.next().await {
//!     if let mlxd_client::Event::Token { text, .. } = event? {
//!         print!("{text}");
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! One connection multiplexes any number of requests: a reader task routes every event to its
//! request by id. Dropping a [`Generation`] (or calling [`Generation::cancel`]) cancels it on
//! the daemon.
#![deny(missing_docs)]

pub mod cli;
pub mod endpoint;

pub use endpoint::Endpoint;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon is not running or not reachable at the endpoint.
    #[error("cannot reach mlxd at {url}: {reason} (is the daemon running? start it with `mlxd serve`)")]
    Connect {
        /// Where we tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The daemon refused the token (HTTP 401) or the origin (403).
    #[error("mlxd refused the connection ({status}): {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The daemon's explanation.
        body: String,
    },
    /// The daemon answered a request with an error event.
    #[error("{code}: {message}")]
    Request {
        /// Stable error code (`invalid_request`, `busy`, ...).
        code: String,
        /// The daemon's message, naming the field or file.
        message: String,
    },
    /// The connection closed before the request finished.
    #[error("the connection to mlxd closed")]
    Closed,
    /// Local configuration problem (token file, URL).
    #[error("{0}")]
    Config(String),
}

/// A generation request; build with [`GenerateRequest::chat`] or [`GenerateRequest::prompt`]
/// and adjust the public fields.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerateRequest {
    /// Model name; the daemon's default when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Raw prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Conversation as `{role, content}` objects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Value>>,
    /// Upper bound on generated tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop strings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Sampling parameters (`temperature`, `top_p`, ...; see the protocol).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub sampling: serde_json::Map<String, Value>,
    /// Sampler plugins: `{name, params}`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<Value>,
    /// Top log-probabilities per token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
}

impl GenerateRequest {
    /// A single user message, rendered with the model's chat template.
    pub fn chat(user: &str) -> Self {
        GenerateRequest { messages: Some(vec![json!({"role": "user", "content": user})]), ..Default::default() }
    }

    /// A raw prompt.
    pub fn prompt(text: &str) -> Self {
        GenerateRequest { prompt: Some(text.to_string()), ..Default::default() }
    }
}

/// Events of one generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request was admitted.
    Started {
        /// Model serving it.
        model: String,
        /// Prompt length.
        prompt_tokens: u64,
    },
    /// New text.
    Token {
        /// Text completed by these tokens.
        text: String,
        /// Token ids.
        tokens: Vec<u32>,
    },
    /// The end; the stream yields nothing after it.
    Done {
        /// `stop`, `length` or `cancelled`.
        finish_reason: String,
        /// The whole `done` message (usage, timings).
        raw: Value,
    },
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Value>>>>;

/// A connection to the daemon.
pub struct Client {
    out: mpsc::UnboundedSender<Message>,
    routes: Routes,
    next_id: AtomicU64,
    /// The daemon's `hello`.
    pub hello: Value,
}

impl Client {
    /// Connects and waits for the daemon's `hello`.
    pub async fn connect(ep: &Endpoint) -> Result<Client, Error> {
        let mut req = ep.url.as_str().into_client_request().map_err(|e| Error::Config(format!("bad URL {}: {e}", ep.url)))?;
        if let Some(t) = &ep.token {
            let v = format!("Bearer {t}").parse().map_err(|_| Error::Config("the token has invalid characters".into()))?;
            req.headers_mut().insert("authorization", v);
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => Error::Refused {
                status: resp.status().as_u16(),
                body: resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default(),
            },
            other => Error::Connect { url: ep.url.clone(), reason: other.to_string() },
        })?;
        let (mut sink, mut source) = ws.split();
        let hello = match source.next().await {
            Some(Ok(Message::Text(t))) => serde_json::from_str::<Value>(t.as_str()).map_err(|_| Error::Closed)?,
            _ => return Err(Error::Closed),
        };
        if hello["type"] != "hello" {
            return Err(Error::Config(format!("expected hello, got {hello}")));
        }
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let routes: Routes = Arc::default();
        let r = routes.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = source.next().await {
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else { continue };
                let id = v["id"].as_str().unwrap_or_default().to_string();
                let route = r.lock().expect("routes").get(&id).cloned();
                if let Some(tx) = route {
                    let _ = tx.send(v);
                }
            }
            r.lock().expect("routes").clear(); // closing every route ends every stream
        });
        Ok(Client { out, routes, next_id: AtomicU64::new(1), hello })
    }

    fn route(&self) -> (String, mpsc::UnboundedReceiver<Value>) {
        let id = format!("c{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().expect("routes").insert(id.clone(), tx);
        (id, rx)
    }

    fn send(&self, v: Value) -> Result<(), Error> {
        self.out.send(Message::text(v.to_string())).map_err(|_| Error::Closed)
    }

    /// Starts a generation.
    pub async fn generate(&self, req: GenerateRequest) -> Result<Generation, Error> {
        let (id, rx) = self.route();
        let mut msg = serde_json::to_value(&req).map_err(|e| Error::Config(e.to_string()))?;
        msg["type"] = json!("generate");
        msg["id"] = json!(id);
        self.send(msg)?;
        Ok(Generation { id, rx, out: self.out.clone(), routes: self.routes.clone(), finished: false })
    }

    /// Sends a non-streaming request (`models`, `status`, `plugins`, `tokenize`, ...) and
    /// returns its `data`.
    pub async fn request(&self, kind: &str, mut fields: Value) -> Result<Value, Error> {
        let (id, mut rx) = self.route();
        fields["type"] = json!(kind);
        fields["id"] = json!(id);
        self.send(fields)?;
        let v = rx.recv().await.ok_or(Error::Closed);
        self.routes.lock().expect("routes").remove(&id);
        let v = v?;
        match v["type"].as_str() {
            Some("result") => Ok(v["data"].clone()),
            Some("error") => Err(request_error(&v)),
            _ => Err(Error::Config(format!("unexpected answer {v}"))),
        }
    }
}

fn request_error(v: &Value) -> Error {
    Error::Request {
        code: v["code"].as_str().unwrap_or("internal").to_string(),
        message: v["message"].as_str().unwrap_or_default().to_string(),
    }
}

/// A running generation: a stream of [`Event`]s.
pub struct Generation {
    id: String,
    rx: mpsc::UnboundedReceiver<Value>,
    out: mpsc::UnboundedSender<Message>,
    routes: Routes,
    finished: bool,
}

impl Generation {
    /// The next event; `None` after `Done`.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        if self.finished {
            return None;
        }
        let Some(v) = self.rx.recv().await else {
            self.finished = true;
            return Some(Err(Error::Closed));
        };
        Some(match v["type"].as_str() {
            Some("started") => Ok(Event::Started {
                model: v["model"].as_str().unwrap_or_default().to_string(),
                prompt_tokens: v["prompt_tokens"].as_u64().unwrap_or(0),
            }),
            Some("token") => Ok(Event::Token {
                text: v["text"].as_str().unwrap_or_default().to_string(),
                tokens: v["tokens"].as_array().map(|a| a.iter().filter_map(|t| t.as_u64().map(|t| t as u32)).collect()).unwrap_or_default(),
            }),
            Some("done") => {
                self.finished = true;
                Ok(Event::Done { finish_reason: v["finish_reason"].as_str().unwrap_or_default().to_string(), raw: v })
            }
            Some("error") => {
                self.finished = true;
                Err(request_error(&v))
            }
            _ => Err(Error::Config(format!("unexpected event {v}"))),
        })
    }

    /// Asks the daemon to stop this generation; a `Done` with `cancelled` follows.
    pub fn cancel(&self) {
        let _ = self.out.send(Message::text(json!({"type": "cancel", "id": self.id}).to_string()));
    }

    /// The request id on the wire.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel();
        }
        self.routes.lock().expect("routes").remove(&self.id);
    }
}
