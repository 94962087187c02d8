//! OpenAI-compatible HTTP endpoints on the daemon's port, for the many tools that speak only that
//! API (editor assistants, agent frameworks, the `openai` SDKs): `POST /v1/chat/completions`,
//! `POST /v1/completions` (answered whole, or streamed as server-sent events with `"stream":
//! true`) and `GET /v1/models`.
//!
//! They are a translation layer, not a second server: a request becomes the WebSocket protocol's
//! `generate` message, goes through the same validation (an error names the field as the client
//! sent it), the same plugin resolution and the same model queue, and shares the continuous batch
//! with every WebSocket client. The same bearer token and the same `Origin` rule apply. One
//! request per connection (`connection: close`); a client that disconnects cancels its request.
//! What the protocol cannot honour (`n` above 1, tools, response formats, log-probabilities on
//! `/v1/completions`) is refused with a 400 that names the field; only fields that change nothing
//! about the answer (`user`, `metadata`, `store`, `service_tier`, a message's `name`) are
//! ignored; chat log-probabilities carry each token's own text. mlxd's own
//! sampling fields (`top_k`, `min_p`, `typical_p`, `repetition_penalty`,
//! `repetition_context_size`) and `plugins` are accepted beside OpenAI's, as vLLM and llama.cpp's
//! server accept theirs.

use crate::chat::Message;
use crate::protocol::{ErrorCode, GenerateMsg, PluginUse, ServerMessage};
use crate::sampling::MAX_LOGPROBS;
use crate::server::{Shared, Stream};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a peeked request head is for these endpoints (the paths under `/v1/`).
pub fn handles(head: &str) -> bool {
    ["GET /v1/", "POST /v1/", "OPTIONS /v1/"].iter().any(|p| head.starts_with(p))
}

/// A refused request: HTTP status and OpenAI's error object.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError {
    /// HTTP status code.
    pub status: u16,
    /// OpenAI's `error.type`.
    pub kind: &'static str,
    /// OpenAI's `error.code` (mlxd's error codes, or OpenAI's where one fits).
    pub code: String,
    /// What is wrong, naming the field.
    pub message: String,
    /// The field at fault, when one is.
    pub param: Option<String>,
}

impl HttpError {
    fn bad(message: impl Into<String>) -> Self {
        let message = message.into();
        HttpError {
            status: 400,
            kind: "invalid_request_error",
            code: "invalid_request".into(),
            param: param_of(&message),
            message,
        }
    }

    fn status(status: u16, kind: &'static str, code: &str, message: impl Into<String>) -> Self {
        HttpError { status, kind, code: code.into(), message: message.into(), param: None }
    }

    /// An mlxd error code as OpenAI's clients expect it: their status decides retries.
    fn from_code(code: ErrorCode, message: String) -> Self {
        let (status, kind, name) = match code {
            ErrorCode::UnknownModel => (404, "invalid_request_error", "model_not_found"),
            ErrorCode::Busy => (429, "rate_limit_error", "busy"),
            ErrorCode::OutOfMemory => (503, "server_error", "out_of_memory"),
            ErrorCode::ShuttingDown => (503, "server_error", "shutting_down"),
            ErrorCode::ModelLoadFailed => (500, "server_error", "model_load_failed"),
            ErrorCode::Internal => (500, "server_error", "internal"),
            ErrorCode::PluginError => (400, "invalid_request_error", "plugin_error"),
            ErrorCode::InvalidMessage
            | ErrorCode::InvalidRequest
            | ErrorCode::DuplicateId
            | ErrorCode::FrameTooLarge => {
                return HttpError::bad(message);
            }
        };
        let param = if code == ErrorCode::UnknownModel { Some("model".into()) } else { param_of(&message) };
        HttpError { status, kind, code: name.into(), param, message }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The first backquoted name of an error message (`temperature` of "`temperature` must ..."),
/// as the client sent it: the protocol's `sampling.` prefix dropped.
fn param_of(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    let name = &message[start..end];
    Some(name.strip_prefix("sampling.").unwrap_or(name).to_string())
}

/// The error messages of the shared validation speak of the protocol's fields: say them as an
/// OpenAI client sent them.
fn as_sent(message: String) -> String {
    message.replace("`sampling.", "`")
}

/// Which endpoint a body is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`: `messages`.
    Chat,
    /// `/v1/completions`: `prompt`.
    Completions,
}

/// A request body translated to the protocol's `generate`.
#[derive(Debug)]
pub struct Translated {
    /// The `generate` message (validated next, by the protocol's own rules).
    pub msg: GenerateMsg,
    /// Server-sent events instead of one answer.
    pub stream: bool,
    /// `stream_options.include_usage`: a last event with the token counts.
    pub include_usage: bool,
}

/// Fields passed into `sampling` under the same name.
const SAMPLING: &[&str] = &[
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logit_bias",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "repetition_context_size",
];

/// Fields accepted and ignored: they change nothing about the answer.
const IGNORED: &[&str] = &["user", "metadata", "store", "service_tier"];

/// Translates a request body; `id` becomes the protocol's request id.
pub fn translate(endpoint: Endpoint, body: &Value, id: &str) -> Result<Translated, HttpError> {
    let obj = body.as_object().ok_or_else(|| HttpError::bad("the request body must be a JSON object"))?;
    let mut sampling = Map::new();
    let mut msg = GenerateMsg {
        id: id.to_string(),
        model: None,
        prompt: None,
        messages: None,
        max_tokens: None,
        stop: Vec::new(),
        sampling: None,
        plugins: Vec::new(),
        logprobs: None,
    };
    let (mut stream, mut include_usage) = (false, false);
    let (mut logprobs, mut top_logprobs) = (false, None);
    for (key, value) in obj {
        let k = key.as_str();
        match k {
            "model" => msg.model = string_or_null(value, k)?,
            "messages" if endpoint == Endpoint::Chat => msg.messages = Some(messages(value)?),
            "prompt" if endpoint == Endpoint::Completions => msg.prompt = Some(prompt(value)?),
            "max_tokens" | "max_completion_tokens" if !value.is_null() => {
                msg.max_tokens =
                    Some(value.as_u64().ok_or_else(|| HttpError::bad(format!("`{k}` must be a positive integer")))?)
            }
            "max_tokens" | "max_completion_tokens" => {}
            "stop" => msg.stop = stop(value)?,
            "stream" => stream = bool_or_null(value, k)?,
            "stream_options" => include_usage = stream_options(value)?,
            "n" | "best_of" if !(value.is_null() || value.as_u64() == Some(1)) => {
                return Err(HttpError::bad(format!("`{k}` must be 1: mlxd answers one choice per request")));
            }
            "n" | "best_of" => {}
            "logprobs" | "echo" if matches!(value, Value::Null | Value::Bool(false)) => {}
            "logprobs" if endpoint == Endpoint::Chat && value == &Value::Bool(true) => logprobs = true,
            "logprobs" if endpoint == Endpoint::Chat => {
                return Err(HttpError::bad(format!("`logprobs` must be true or false, got {value}")));
            }
            "top_logprobs" if endpoint == Endpoint::Chat => {
                top_logprobs = match value {
                    Value::Null => None,
                    v => Some(v.as_u64().filter(|&n| n <= u64::from(MAX_LOGPROBS)).ok_or_else(|| {
                        HttpError::bad(format!("`top_logprobs` must be an integer from 0 to {MAX_LOGPROBS}, got {v}"))
                    })?),
                }
            }
            "logprobs" | "top_logprobs" => {
                return Err(HttpError::bad(format!(
                    "`{k}` is not supported on /v1/completions (/v1/chat/completions and the WebSocket protocol have them)"
                )));
            }
            "suffix" if value.is_null() => {}
            "response_format" if value.get("type").and_then(Value::as_str) == Some("text") => {}
            "plugins" => {
                msg.plugins = serde_json::from_value::<Vec<PluginUse>>(value.clone())
                    .map_err(|e| HttpError::bad(format!("`plugins`: {e}")))?
            }
            k if SAMPLING.contains(&k) => {
                if !value.is_null() {
                    sampling.insert(k.to_string(), value.clone());
                }
            }
            k if IGNORED.contains(&k) => {}
            other => {
                return Err(HttpError::bad(format!(
                    "`{other}` is not supported by mlxd's {} endpoint",
                    if endpoint == Endpoint::Chat { "/v1/chat/completions" } else { "/v1/completions" }
                )))
            }
        }
    }
    match (logprobs, top_logprobs) {
        (true, n) => msg.logprobs = Some(n.unwrap_or(0) as u32), // at most MAX_LOGPROBS, checked above
        (false, Some(n)) if n > 0 => return Err(HttpError::bad("`top_logprobs` needs `logprobs: true`")),
        (false, _) => {}
    }
    match endpoint {
        Endpoint::Chat if msg.messages.is_none() => return Err(HttpError::bad("`messages` is required")),
        Endpoint::Completions if msg.prompt.is_none() => return Err(HttpError::bad("`prompt` is required")),
        _ => {}
    }
    // OpenAI's default temperature is 1; the protocol's is 0 (greedy). A client that sends none
    // gets OpenAI's behaviour.
    sampling.entry("temperature").or_insert(json!(1.0));
    msg.sampling = Some(Value::Object(sampling));
    Ok(Translated { msg, stream, include_usage: stream && include_usage })
}

/// A request body translated ([`translate`]) and validated by the protocol's rules, with its
/// `stream` and `stream_options.include_usage`; plugins are resolved by the caller.
pub fn prepare(
    endpoint: Endpoint,
    body: &Value,
    id: &str,
    limits: &crate::config::LimitsConfig,
) -> Result<(crate::validation::ValidGenerate, bool, bool), HttpError> {
    let t = translate(endpoint, body, id)?;
    let v = crate::validation::validate_generate(t.msg, limits).map_err(|m| HttpError::bad(as_sent(m)))?;
    Ok((v, t.stream, t.include_usage))
}

fn string_or_null(v: &Value, field: &str) -> Result<Option<String>, HttpError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(HttpError::bad(format!("`{field}` must be a string"))),
    }
}

fn bool_or_null(v: &Value, field: &str) -> Result<bool, HttpError> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        _ => Err(HttpError::bad(format!("`{field}` must be true or false"))),
    }
}

fn stream_options(v: &Value) -> Result<bool, HttpError> {
    match v {
        Value::Null => Ok(false),
        Value::Object(o) => match o.get("include_usage") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(HttpError::bad("`stream_options.include_usage` must be true or false")),
        },
        _ => Err(HttpError::bad("`stream_options` must be an object")),
    }
}

fn stop(v: &Value) -> Result<Vec<String>, HttpError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(String::from).ok_or_else(|| HttpError::bad(format!("`stop[{i}]` must be a string")))
            })
            .collect(),
        _ => Err(HttpError::bad("`stop` must be a string or an array of strings")),
    }
}

fn prompt(v: &Value) -> Result<String, HttpError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            Ok(items[0].as_str().unwrap_or_default().into())
        }
        Value::Array(_) => Err(HttpError::bad("`prompt` must be one string: mlxd answers one prompt per request")),
        _ => Err(HttpError::bad("`prompt` must be a string")),
    }
}

/// Chat messages: `content` a string or text parts; OpenAI's `developer` role is the system's.
fn messages(v: &Value) -> Result<Vec<Message>, HttpError> {
    let items = v.as_array().ok_or_else(|| HttpError::bad("`messages` must be an array"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let fields = m.as_object().ok_or_else(|| HttpError::bad(format!("`messages[{i}]` must be an object")))?;
            // `name` changes nothing here; tool calls and anything else would be dropped unseen.
            if let Some(other) = fields.keys().find(|k| !matches!(k.as_str(), "role" | "content" | "name")) {
                return Err(HttpError::bad(format!("`messages[{i}].{other}` is not supported: mlxd's chat takes role and content")));
            }
            let role = fields
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| HttpError::bad(format!("`messages[{i}].role` must be a string")))?;
            let content = match fields.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(HttpError::bad(format!(
                                    "`messages[{i}].content[{j}]` must be a text part ({{\"type\": \"text\", \"text\": ...}}): mlxd serves text models"
                                )))
                            }
                        }
                    }
                    text
                }
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(HttpError::bad(format!("`messages[{i}].content` must be a string or text parts"))),
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(Message { role: role.to_string(), content })
        })
        .collect()
}

/// Request ids for the OpenAI endpoints (`chatcmpl-N`, `cmpl-N`).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The request head.
struct Head {
    method: String,
    path: String,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    /// Body bytes read with the head.
    rest: Vec<u8>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> Result<Head, HttpError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > MAX_HEAD {
            return Err(HttpError::status(431, "invalid_request_error", "head_too_large", "request head over 16 KiB"));
        }
        let n = s.read(&mut chunk).await.map_err(|e| HttpError::bad(format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(HttpError::bad("the connection closed before the request head ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::bad("the request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let (method, path) = (first.next().unwrap_or_default().to_string(), first.next().unwrap_or_default().to_string());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Head { method, path, headers, rest: buf[end + 4..].to_vec() })
}

async fn read_body(s: &mut (impl AsyncRead + Unpin), head: &Head, limit: usize) -> Result<Value, HttpError> {
    if head.header("transfer-encoding").is_some() {
        return Err(HttpError::status(
            411,
            "invalid_request_error",
            "length_required",
            "send the body with a content-length (chunked bodies are not read)",
        ));
    }
    let len: usize = match head.header("content-length") {
        Some(v) => v.parse().map_err(|_| HttpError::bad(format!("content-length {v:?} is not a number")))?,
        None => {
            return Err(HttpError::status(
                411,
                "invalid_request_error",
                "length_required",
                "a POST needs a content-length",
            ))
        }
    };
    if len > limit {
        return Err(HttpError::status(
            413,
            "invalid_request_error",
            "frame_too_large",
            format!("the body is {len} bytes; at most {limit} (server.max_frame_bytes)"),
        ));
    }
    let mut body = head.rest.clone();
    body.truncate(len);
    let mut chunk = [0u8; 8192];
    while body.len() < len {
        let n = s.read(&mut chunk).await.map_err(|e| HttpError::bad(format!("reading the body: {e}")))?;
        if n == 0 {
            return Err(HttpError::bad(format!("the connection closed after {} of {len} body bytes", body.len())));
        }
        body.extend_from_slice(&chunk[..n.min(len - body.len())]);
    }
    serde_json::from_slice(&body).map_err(|e| HttpError::bad(format!("the body is not valid JSON: {e}")))
}

/// Serves one request on `stream` and closes it.
pub async fn serve(stream: Box<dyn Stream>, shared: Arc<Shared>) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut rd)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return reply_error(&mut wr, &e, None).await,
        Err(_) => return,
    };
    // The WebSocket handshake's rules: a browser page only from an allow-listed origin (checked
    // before the token, so a page learns nothing about it), then the token.
    let origin = head.header("origin").map(String::from);
    if let Some(o) = &origin {
        if !shared.config.server.allowed_origins.iter().any(|a| a == o) {
            shared.metrics.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            let e = HttpError::status(
                403,
                "invalid_request_error",
                "origin_not_allowed",
                format!("origin {o:?} is not in server.allowed_origins"),
            );
            return reply_error(&mut wr, &e, None).await;
        }
    }
    let cors = origin.map(|o| format!("access-control-allow-origin: {o}\r\nvary: origin\r\n")).unwrap_or_default();
    if head.method == "OPTIONS" {
        let resp = format!(
            "HTTP/1.1 204 No Content\r\n{cors}access-control-allow-methods: GET, POST, OPTIONS\r\n\
             access-control-allow-headers: authorization, content-type\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let _ = wr.write_all(resp.as_bytes()).await;
        let _ = wr.shutdown().await;
        return;
    }
    if let Some(expected) = &shared.token {
        let given = head.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        if !given.is_some_and(|g| crate::auth::token_matches(expected, g)) {
            shared.metrics.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            let why = if given.is_some() {
                "wrong token"
            } else {
                "missing token: send `Authorization: Bearer TOKEN` (the token file is in the state directory)"
            };
            let e = HttpError::status(401, "invalid_request_error", "unauthorized", why);
            return reply_error(&mut wr, &e, Some(&cors)).await;
        }
    }
    let path = head.path.split('?').next().unwrap_or_default();
    let endpoint = match (head.method.as_str(), path) {
        ("GET", "/v1/models") => {
            return reply_json(&mut wr, 200, &models(&shared), &cors).await;
        }
        ("POST", "/v1/chat/completions") => Endpoint::Chat,
        ("POST", "/v1/completions") => Endpoint::Completions,
        (method, path) => {
            let e = HttpError::status(
                404,
                "invalid_request_error",
                "not_found",
                format!("no {method} {path}: mlxd serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions"),
            );
            return reply_error(&mut wr, &e, Some(&cors)).await;
        }
    };
    // curl asks before sending a larger body, and waits a second for the answer otherwise.
    if head.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) && head.rest.is_empty() {
        let _ = wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    }
    let body = match tokio::time::timeout(READ_TIMEOUT, read_body(&mut rd, &head, shared.config.server.max_frame_bytes))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return reply_error(&mut wr, &e, Some(&cors)).await,
        Err(_) => return,
    };
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{n}"),
        Endpoint::Completions => format!("cmpl-{n}"),
    };
    let valid = prepare(endpoint, &body, &id, &shared.config.limits).and_then(|(mut v, stream, include_usage)| {
        crate::connection::resolve_plugins(&mut v, &shared)
            .map(|()| (v, stream, include_usage))
            .map_err(|m| HttpError::from_code(ErrorCode::PluginError, m))
    });
    let (v, stream, include_usage) = match valid {
        Ok(x) => x,
        Err(e) => return reply_error(&mut wr, &e, Some(&cors)).await,
    };

    // The request runs as a WebSocket request does; its events come back here. A client that
    // goes away (its half of the connection ends) or a server shutdown cancels it.
    let wants_logprobs = v.sampling.logprobs.is_some();
    let cancel = Arc::new(AtomicBool::new(false));
    let (out, mut events) = mpsc::channel::<ServerMessage>(shared.config.server.stream_buffer.max(2));
    let task = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move { crate::connection::run_generate(v, cancel, &shared, &out).await })
    };
    let watcher = {
        let (cancel, mut shutdown) = (cancel.clone(), shared.shutdown.subscribe());
        tokio::spawn(async move {
            let mut sink = [0u8; 512];
            loop {
                tokio::select! {
                    r = rd.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break },
                    _ = shutdown.recv() => break,
                }
            }
            cancel.store(true, Ordering::SeqCst);
        })
    };
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let logprobs = wants_logprobs.then(Vec::new);
    let mut answer = Answer { id, endpoint, created, model: String::new(), text: String::new(), logprobs };
    if stream {
        stream_events(&mut wr, &mut events, &mut answer, include_usage, &cors, &cancel).await;
    } else {
        whole(&mut wr, &mut events, &mut answer, &cors).await;
    }
    watcher.abort();
    let _ = task.await;
}

/// What the answer so far is made of.
struct Answer {
    id: String,
    endpoint: Endpoint,
    created: u64,
    model: String,
    text: String,
    /// The tokens' log-probability entries so far, when the request asked for them.
    logprobs: Option<Vec<Value>>,
}

impl Answer {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    /// One choice: `piece` as a chat delta / message or a completion's text; `entries`, its
    /// tokens' log-probabilities where the request asked for them.
    fn choice(&self, piece: Value, finish: Option<&str>, chunk: bool, entries: &[Value]) -> Value {
        match self.endpoint {
            Endpoint::Chat => {
                let field = if chunk { "delta" } else { "message" };
                let logprobs = if self.logprobs.is_some() { json!({"content": entries}) } else { Value::Null };
                json!({"index": 0, field: piece, "logprobs": logprobs, "finish_reason": finish})
            }
            Endpoint::Completions => json!({"index": 0, "text": piece, "logprobs": null, "finish_reason": finish}),
        }
    }

    fn envelope(&self, choices: Value, chunk: bool) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
}

/// OpenAI's log-probability entry of one token, from the protocol's `logprobs` object: the
/// token's own text, its bytes (of that text) and the alternatives.
fn logprob_entry(l: &Value) -> Value {
    let one = |text: &Value, logprob: &Value| {
        let bytes = text.as_str().map(|t| t.as_bytes().to_vec());
        json!({"token": text, "logprob": logprob, "bytes": bytes})
    };
    let mut entry = one(&l["text"], &l["logprob"]);
    let top: Vec<Value> =
        l["top"].as_array().map(|t| t.iter().map(|x| one(&x["text"], &x["logprob"])).collect()).unwrap_or_default();
    entry["top_logprobs"] = Value::Array(top);
    entry
}

fn usage(u: &crate::protocol::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn finish_reason(f: crate::engine::FinishReason) -> &'static str {
    match f {
        crate::engine::FinishReason::Stop => "stop",
        crate::engine::FinishReason::Length => "length",
        crate::engine::FinishReason::Cancelled => "cancelled",
    }
}

/// Collects the whole answer, then replies once.
async fn whole(
    wr: &mut (impl AsyncWrite + Unpin),
    events: &mut mpsc::Receiver<ServerMessage>,
    a: &mut Answer,
    cors: &str,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            ServerMessage::Started { model, .. } => a.model = model,
            ServerMessage::Token { text, logprobs, .. } => {
                a.text.push_str(&text);
                if let (Some(entries), Some(l)) = (a.logprobs.as_mut(), logprobs) {
                    entries.push(logprob_entry(&l));
                }
            }
            ServerMessage::Done { finish_reason: f, usage: u, .. } => {
                let piece = match a.endpoint {
                    Endpoint::Chat => json!({"role": "assistant", "content": a.text}),
                    Endpoint::Completions => json!(a.text),
                };
                let entries = a.logprobs.clone().unwrap_or_default();
                let mut body = a.envelope(json!([a.choice(piece, Some(finish_reason(f)), false, &entries)]), false);
                body["usage"] = usage(&u);
                return reply_json(wr, 200, &body, cors).await;
            }
            ServerMessage::Error { code, message, .. } => {
                return reply_error(wr, &HttpError::from_code(code, as_sent(message)), Some(cors)).await;
            }
            _ => {}
        }
    }
    let e = HttpError::status(500, "server_error", "internal", "the request ended without a final event");
    reply_error(wr, &e, Some(cors)).await;
}

/// Streams the answer as server-sent events. An error before the first token is an HTTP error;
/// one after it is an `error` event, and the stream ends without `[DONE]`.
async fn stream_events(
    wr: &mut (impl AsyncWrite + Unpin),
    events: &mut mpsc::Receiver<ServerMessage>,
    a: &mut Answer,
    include_usage: bool,
    cors: &str,
    cancel: &AtomicBool,
) {
    let mut open = false;
    while let Some(ev) = events.recv().await {
        let mut frames: Vec<Value> = Vec::new();
        let mut last = false;
        match ev {
            ServerMessage::Started { model, .. } => {
                a.model = model;
                let head = format!(
                    "HTTP/1.1 200 OK\r\n{cors}content-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n"
                );
                if wr.write_all(head.as_bytes()).await.is_err() {
                    cancel.store(true, Ordering::SeqCst);
                    continue;
                }
                open = true;
                if a.endpoint == Endpoint::Chat {
                    frames.push(a.envelope(
                        json!([a.choice(json!({"role": "assistant", "content": ""}), None, true, &[])]),
                        true,
                    ));
                }
            }
            // A token that completes no text yet (a piece of a character, the end-of-sequence
            // token) has an event of its own only where its log-probabilities were asked for.
            ServerMessage::Token { text, logprobs, .. } if !text.is_empty() || a.logprobs.is_some() => {
                let piece = match a.endpoint {
                    Endpoint::Chat => json!({"content": text}),
                    Endpoint::Completions => json!(text),
                };
                let entries: Vec<Value> = logprobs.iter().map(logprob_entry).collect();
                frames.push(a.envelope(json!([a.choice(piece, None, true, &entries)]), true));
            }
            ServerMessage::Done { finish_reason: f, usage: u, .. } => {
                let piece = match a.endpoint {
                    Endpoint::Chat => json!({}),
                    Endpoint::Completions => json!(""),
                };
                frames.push(a.envelope(json!([a.choice(piece, Some(finish_reason(f)), true, &[])]), true));
                if include_usage {
                    let mut tail = a.envelope(json!([]), true);
                    tail["usage"] = usage(&u);
                    frames.push(tail);
                }
                last = true;
            }
            ServerMessage::Error { code, message, .. } => {
                let e = HttpError::from_code(code, as_sent(message));
                if !open {
                    return reply_error(wr, &e, Some(cors)).await;
                }
                let _ = wr.write_all(format!("data: {}\n\n", e.body()).as_bytes()).await;
                let _ = wr.shutdown().await;
                return;
            }
            _ => {}
        }
        if !open {
            continue;
        }
        let mut text = String::new();
        for f in &frames {
            text.push_str(&format!("data: {f}\n\n"));
        }
        if last {
            text.push_str("data: [DONE]\n\n");
        }
        if !text.is_empty() && (wr.write_all(text.as_bytes()).await.is_err() || wr.flush().await.is_err()) {
            // The client went away: stop generating for it; the events left drain below.
            cancel.store(true, Ordering::SeqCst);
        }
        if last {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// The `/v1/models` listing.
fn models(shared: &Shared) -> Value {
    let listing = shared.registry.listing();
    let data: Vec<Value> = listing["models"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["name"].as_str())
                .map(|name| json!({"id": name, "object": "model", "created": 0, "owned_by": "mlxd"}))
                .collect()
        })
        .unwrap_or_default();
    json!({"object": "list", "data": data})
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

async fn reply_json(wr: &mut (impl AsyncWrite + Unpin), status: u16, body: &Value, cors: &str) {
    let body = body.to_string();
    let resp = format!(
        "HTTP/1.1 {status} {}\r\n{cors}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    let _ = wr.write_all(resp.as_bytes()).await;
    let _ = wr.shutdown().await;
}

async fn reply_error(wr: &mut (impl AsyncWrite + Unpin), e: &HttpError, cors: Option<&str>) {
    reply_json(wr, e.status, &e.body(), cors.unwrap_or_default()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Translated, HttpError> {
        translate(Endpoint::Chat, &body, "chatcmpl-1")
    }

    #[test]
    fn a_chat_body_becomes_a_generate_message() {
        let t = chat(json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 7, "stop": "\n", "temperature": 0.2, "top_p": 0.9, "seed": 3, "top_k": 40,
            "logit_bias": {"42": -100}, "n": 1, "user": "u", "plugins": [{"name": "dry", "params": {"base": 2}}],
        }))
        .unwrap();
        assert!(t.stream && t.include_usage);
        let m = t.msg;
        assert_eq!((m.id.as_str(), m.model.as_deref(), m.max_tokens), ("chatcmpl-1", Some("m"), Some(7)));
        let roles: Vec<_> =
            m.messages.as_ref().unwrap().iter().map(|x| (x.role.as_str(), x.content.as_str())).collect();
        assert_eq!(roles, [("system", "Be brief."), ("user", "Hi there")]);
        assert_eq!(m.stop, ["\n"]);
        assert_eq!(
            m.sampling.unwrap(),
            json!({"temperature": 0.2, "top_p": 0.9, "seed": 3, "top_k": 40, "logit_bias": {"42": -100}})
        );
        assert_eq!(m.plugins[0].name, "dry");
    }

    #[test]
    fn chat_logprobs_become_the_protocols_and_completions_refuse_them() {
        let t = chat(json!({"messages": [], "logprobs": true, "top_logprobs": 5})).unwrap();
        assert_eq!(t.msg.logprobs, Some(5));
        assert_eq!(chat(json!({"messages": [], "logprobs": true})).unwrap().msg.logprobs, Some(0));
        assert_eq!(chat(json!({"messages": [], "logprobs": false, "top_logprobs": 0})).unwrap().msg.logprobs, None);
        let e = translate(Endpoint::Completions, &json!({"prompt": "x", "logprobs": 1}), "c").unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("logprobs")));
    }

    #[test]
    fn openai_defaults_apply_where_the_body_is_silent() {
        let t = translate(
            Endpoint::Completions,
            &json!({"prompt": ["Once"], "stream": false, "stream_options": {"include_usage": true}}),
            "c",
        )
        .unwrap();
        assert_eq!(t.msg.prompt.as_deref(), Some("Once"));
        // OpenAI samples at temperature 1 unless told; usage events only come with a stream.
        assert_eq!(t.msg.sampling.unwrap(), json!({"temperature": 1.0}));
        assert!(!t.stream && !t.include_usage);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (body, field) in [
            (json!({"messages": [], "n": 2}), "n"),
            (json!({"messages": [], "tools": []}), "tools"),
            (json!({"messages": [], "top_logprobs": 3}), "top_logprobs"),
            (json!({"messages": [], "logprobs": true, "top_logprobs": 21}), "top_logprobs"),
            (json!({"messages": [], "logprobs": 2}), "logprobs"),
            (json!({"messages": [], "response_format": {"type": "json_object"}}), "response_format"),
            (json!({"messages": [], "max_tokens": "many"}), "max_tokens"),
            (json!({"messages": [], "stop": [1]}), "stop[0]"),
            (json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0].content[0]"),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}), "messages[0].tool_calls"),
            (json!({"messages": ["hi"]}), "messages[0]"),
            (json!({"messages": [], "stream": "yes"}), "stream"),
            (json!({"prompt": "x"}), "prompt"),
            (json!({"model": "m"}), "messages"),
        ] {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(field)), "{body}: {e:?}");
            assert!(e.message.contains(&format!("`{field}`")), "{e:?}");
        }
        assert_eq!(chat(json!([1])).unwrap_err().status, 400);
    }

    #[test]
    fn protocol_errors_become_openai_errors() {
        let e = HttpError::from_code(ErrorCode::UnknownModel, "no model named `x`".into());
        assert_eq!((e.status, e.code.as_str(), e.param.as_deref()), (404, "model_not_found", Some("model")));
        let e = HttpError::from_code(ErrorCode::PluginError, "`plugins[0].name`: no plugin `dr`".into());
        assert_eq!((e.status, e.param.as_deref()), (400, Some("plugins[0].name")));
        assert_eq!(HttpError::from_code(ErrorCode::Busy, "full".into()).status, 429);
        assert_eq!(HttpError::from_code(ErrorCode::Internal, "x".into()).status, 500);
        let e = HttpError::bad(as_sent("`sampling.temperature` must be at least 0".into()));
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("temperature"), "`temperature` must be at least 0"));
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
    }
}
