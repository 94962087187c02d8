//! Protocol v1: JSON text frames over WebSocket, specified in `docs/protocol.md`.
//!
//! Client messages carry a client-chosen `id`; every answer and event names it, so requests are
//! multiplexed on one connection. This file holds only the wire types; [`crate::validation`]
//! turns them into checked requests.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this server speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A message from a client. Unknown fields are refused so typos surface as errors.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// Start a generation.
    Generate(GenerateMsg),
    /// Stop a running generation.
    Cancel {
        /// The generation's id.
        id: String,
    },
    /// Text to token ids.
    Tokenize {
        /// Request id.
        id: String,
        /// Model name (default model when absent).
        #[serde(default)]
        model: Option<String>,
        /// The text.
        text: String,
        /// Add the model's BOS token where it uses one.
        #[serde(default)]
        add_special: bool,
    },
    /// Token ids to text.
    Detokenize {
        /// Request id.
        id: String,
        /// Model name.
        #[serde(default)]
        model: Option<String>,
        /// The ids.
        tokens: Vec<u32>,
    },
    /// List configured models and whether they are resident.
    Models {
        /// Request id.
        id: String,
    },
    /// Make a model resident.
    Load {
        /// Request id.
        id: String,
        /// Model name.
        model: String,
    },
    /// Release a resident model.
    Unload {
        /// Request id.
        id: String,
        /// Model name.
        model: String,
    },
    /// List sampler plugins.
    Plugins {
        /// Request id.
        id: String,
    },
    /// Scan the configured plugin directories again (like SIGHUP); answers with the listing.
    /// Running requests keep the plugin libraries they use.
    ReloadPlugins {
        /// Request id.
        id: String,
    },
    /// Server status and metrics.
    Status {
        /// Request id.
        id: String,
    },
}

/// `generate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateMsg {
    /// Client-chosen id, unique among this connection's running requests.
    pub id: String,
    /// Model name (default model when absent).
    #[serde(default)]
    pub model: Option<String>,
    /// A raw prompt (exclusive with `messages`).
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation rendered with the model's chat template.
    #[serde(default)]
    pub messages: Option<Vec<crate::chat::Message>>,
    /// Upper bound on generated tokens.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Stop strings (at most 16, each at most 256 bytes).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Sampling parameters (see docs/protocol.md); validated field by field.
    #[serde(default)]
    pub sampling: Option<Value>,
    /// Sampler plugins by name, with their parameters.
    #[serde(default)]
    pub plugins: Vec<PluginUse>,
    /// Top log-probabilities per token (0-20).
    #[serde(default)]
    pub logprobs: Option<u32>,
}

/// A plugin named by a request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginUse {
    /// The plugin's name as listed by `plugins`.
    pub name: String,
    /// Its parameters (a JSON object).
    #[serde(default)]
    pub params: Value,
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, or an unknown `type`.
    InvalidMessage,
    /// A field is missing, of the wrong type, or out of range (the message names it).
    InvalidRequest,
    /// The request id is already running on this connection.
    DuplicateId,
    /// No model of that name is configured.
    UnknownModel,
    /// The model could not be loaded.
    ModelLoadFailed,
    /// The queue is full or a connection limit is reached; try again later.
    Busy,
    /// Not enough device memory under the budget.
    OutOfMemory,
    /// A plugin failed or is unknown.
    PluginError,
    /// The message exceeded `max_frame_bytes`.
    FrameTooLarge,
    /// The server is shutting down.
    ShuttingDown,
    /// Anything else; the message says what.
    Internal,
}

/// Usage counts of a finished generation.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prompt cache.
    pub cached_tokens: usize,
}

/// Timings of a finished generation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timings {
    /// Queue + prefill, until the first token.
    pub time_to_first_token_ms: f64,
    /// Decode speed after the first token.
    pub tokens_per_second: f64,
    /// From receipt to the last token.
    pub total_ms: f64,
}

/// A message to a client.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Sent once, right after the WebSocket handshake.
    Hello {
        /// Protocol version.
        protocol: u32,
        /// `mlxd <version>`.
        server: String,
        /// What this server can do.
        capabilities: Value,
        /// The model used when a request names none.
        default_model: String,
    },
    /// A generation was admitted and its prompt processed up to the first token.
    Started {
        /// Request id.
        id: String,
        /// Model serving it.
        model: String,
        /// Prompt length in tokens.
        prompt_tokens: usize,
    },
    /// New output.
    Token {
        /// Request id.
        id: String,
        /// Text completed by these tokens (may be empty mid-character).
        text: String,
        /// Token ids.
        tokens: Vec<u32>,
        /// Log-probabilities, when asked for.
        #[serde(skip_serializing_if = "Option::is_none")]
        logprobs: Option<Value>,
    },
    /// A generation ended.
    Done {
        /// Request id.
        id: String,
        /// `stop`, `length` or `cancelled`.
        finish_reason: crate::engine::FinishReason,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
    },
    /// The answer to a non-streaming request.
    Result {
        /// Request id.
        id: String,
        /// Request-specific payload (see docs/protocol.md).
        data: Value,
    },
    /// A request failed, or a message could not be understood (`id` absent then).
    Error {
        /// Request id, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Stable machine-readable code.
        code: ErrorCode,
        /// What went wrong, naming the field or file.
        message: String,
    },
}

impl ServerMessage {
    /// An error event.
    pub fn error(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error { id: id.map(String::from), code, message: message.into() }
    }
}

/// Parses a text frame. Errors say what is wrong, and carry the `id` when one could be read,
/// so the client can match the error to its request.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, (Option<String>, ErrorCode, String)> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| (None, ErrorCode::InvalidMessage, format!("not valid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err((None, ErrorCode::InvalidMessage, "a message must be a JSON object".into()));
    };
    let id = obj.get("id").and_then(Value::as_str).map(String::from);
    let kind = match obj.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(_) => return Err((id, ErrorCode::InvalidMessage, "`type` must be a string".into())),
        None => return Err((id, ErrorCode::InvalidMessage, "missing field `type`".into())),
    };
    const KNOWN: [&str; 10] =
        ["generate", "cancel", "tokenize", "detokenize", "models", "load", "unload", "plugins", "reload_plugins", "status"];
    if !KNOWN.contains(&kind.as_str()) {
        return Err((id, ErrorCode::InvalidMessage, format!("unknown message type `{kind}` (known: {})", KNOWN.join(", "))));
    }
    if kind == "generate" {
        // Deserialized on its own so the error can name the field (`max_tokens: invalid type`).
        let mut fields = value;
        fields.as_object_mut().expect("checked above").remove("type");
        return serde_path_to_error::deserialize::<_, GenerateMsg>(fields)
            .map(ClientMessage::Generate)
            .map_err(|e| (id, ErrorCode::InvalidRequest, format!("generate: `{}`: {}", e.path(), e.inner())));
    }
    serde_json::from_value(value).map_err(|e| (id, ErrorCode::InvalidRequest, format!("{kind}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_errors_name_what_is_wrong() {
        let m = parse_client_message(r#"{"type":"generate","id":"a","prompt":"hi","max_tokens":5}"#).unwrap();
        assert!(matches!(m, ClientMessage::Generate(ref g) if g.id == "a" && g.max_tokens == Some(5)));
        let (_, code, msg) = parse_client_message("{nope").unwrap_err();
        assert_eq!(code, ErrorCode::InvalidMessage);
        assert!(msg.contains("JSON"));
        let (id, code, msg) = parse_client_message(r#"{"type":"fly","id":"x"}"#).unwrap_err();
        assert_eq!((id.as_deref(), code), (Some("x"), ErrorCode::InvalidMessage));
        assert!(msg.contains("fly"));
        let (id, code, msg) = parse_client_message(r#"{"type":"generate","id":"b","prompt":"p","max_tokens":"x"}"#).unwrap_err();
        assert_eq!((id.as_deref(), code), (Some("b"), ErrorCode::InvalidRequest));
        assert!(msg.contains("invalid type"), "{msg}");
        let (_, _, msg) = parse_client_message(r#"{"type":"generate","id":"c","prompt":"p","max_tokenz":1}"#).unwrap_err();
        assert!(msg.contains("max_tokenz"), "{msg}");
        let (_, _, msg) = parse_client_message("[1,2]").unwrap_err();
        assert!(msg.contains("object"));
        let m = parse_client_message(r#"{"type":"reload_plugins","id":"r"}"#).unwrap();
        assert!(matches!(m, ClientMessage::ReloadPlugins { ref id } if id == "r"));
        let m = parse_client_message(r#"{"type":"generate","id":"p","prompt":"x","plugins":[{"name":"dry","params":{"base":2}}]}"#).unwrap();
        assert!(matches!(m, ClientMessage::Generate(ref g) if g.plugins[0].name == "dry" && g.plugins[0].params["base"] == 2));
    }

    #[test]
    fn events_serialize_with_their_type_tag() {
        let e = ServerMessage::error(Some("r"), ErrorCode::UnknownModel, "no model `x`");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "unknown_model");
        assert_eq!(v["id"], "r");
    }
}
