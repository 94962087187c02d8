//! Turns a protocol `generate` message into a checked request. Every error names the field and
//! the bound it broke; limits come from `config.toml`'s `[limits]`.

use crate::config::LimitsConfig;
use crate::engine::worker::PromptInput;
use crate::protocol::GenerateMsg;
use crate::sampling::SamplingParams;

/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Longest request id, bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most messages in a conversation.
pub const MAX_MESSAGES: usize = 1024;
/// Most plugins per request.
pub const MAX_PLUGINS: usize = 8;

/// A `generate` request that passed every check that needs no model.
#[derive(Debug, Clone)]
pub struct ValidGenerate {
    /// Client's id.
    pub id: String,
    /// Model name, if given.
    pub model: Option<String>,
    /// Prompt.
    pub input: PromptInput,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling parameters (vocabulary bounds are checked by the model thread).
    pub sampling: SamplingParams,
    /// Plugins by name with their parameters.
    pub plugins: Vec<crate::protocol::PluginUse>,
}

/// Checks a request id.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(format!("`id` must be 1 to {MAX_ID_BYTES} bytes, got {}", id.len()));
    }
    Ok(())
}

/// Validates `msg` against `limits`.
pub fn validate_generate(msg: GenerateMsg, limits: &LimitsConfig) -> Result<ValidGenerate, String> {
    check_id(&msg.id)?;
    let input = match (msg.prompt, msg.messages) {
        (Some(_), Some(_)) => return Err("give either `prompt` or `messages`, not both".into()),
        (None, None) => return Err("one of `prompt` or `messages` is required".into()),
        (Some(p), None) => {
            if p.is_empty() {
                return Err("`prompt` must not be empty".into());
            }
            PromptInput::Text(p)
        }
        (None, Some(m)) => {
            if m.is_empty() || m.len() > MAX_MESSAGES {
                return Err(format!("`messages` must hold 1 to {MAX_MESSAGES} messages, got {}", m.len()));
            }
            for (i, msg) in m.iter().enumerate() {
                if !matches!(msg.role.as_str(), "system" | "user" | "assistant" | "tool") {
                    return Err(format!("`messages[{i}].role` must be system, user, assistant or tool, got {:?}", msg.role));
                }
            }
            PromptInput::Messages(m)
        }
    };
    let max_tokens = match msg.max_tokens {
        None => limits.default_max_tokens,
        Some(0) => return Err("`max_tokens` must be at least 1".into()),
        Some(n) if n > limits.max_tokens as u64 => {
            return Err(format!("`max_tokens` must be at most {} (limits.max_tokens), got {n}", limits.max_tokens))
        }
        Some(n) => n as usize,
    };
    if msg.stop.len() > MAX_STOP_STRINGS {
        return Err(format!("`stop` holds at most {MAX_STOP_STRINGS} strings, got {}", msg.stop.len()));
    }
    if let Some((i, s)) = msg.stop.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(format!("`stop[{i}]` must be 1 to {MAX_STOP_BYTES} bytes, got {}", s.len()));
    }
    let mut sampling: SamplingParams = match msg.sampling {
        None => SamplingParams::default(),
        Some(v) if v.is_object() => serde_path_to_error::deserialize(v).map_err(|e| match e.path().to_string().as_str() {
            "." => format!("`sampling`: {}", e.inner()),
            path => format!("`sampling.{path}`: {}", e.inner()),
        })?,
        Some(_) => return Err("`sampling` must be an object".into()),
    };
    if msg.logprobs.is_some() {
        sampling.logprobs = msg.logprobs;
    }
    // Bounds that need no vocabulary; the token ids of `logit_bias` are checked by the model.
    sampling.validate(usize::MAX).map_err(|e| format!("`sampling.{}", e.to_string().trim_start_matches('`')))?;
    if msg.plugins.len() > MAX_PLUGINS {
        return Err(format!("`plugins` holds at most {MAX_PLUGINS} entries, got {}", msg.plugins.len()));
    }
    for (i, u) in msg.plugins.iter().enumerate() {
        if u.name.is_empty() || u.name.len() > 64 {
            return Err(format!("`plugins[{i}].name` must be 1 to 64 bytes, got {}", u.name.len()));
        }
        if looks_like_a_path(&u.name) {
            return Err(format!(
                "`plugins[{i}].name` is {:?}, which looks like a file: clients name plugins from the `plugins` listing, \
                 never paths (the daemon loads libraries only from its configured [plugins] dirs)",
                u.name
            ));
        }
        if !(u.params.is_null() || u.params.is_object()) {
            return Err(format!("`plugins[{i}].params` must be an object"));
        }
    }
    Ok(ValidGenerate { id: msg.id, model: msg.model, input, max_tokens, stop: msg.stop, sampling, plugins: msg.plugins })
}

/// A plugin name that is really a path or a library file name.
fn looks_like_a_path(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    name.contains(['/', '\\', '\0'])
        || name.starts_with('.')
        || [".so", ".dylib", ".dll"].iter().any(|x| lower.ends_with(x) || lower.contains(&format!("{x}.")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_client_message, ClientMessage};

    fn check(json: &str) -> Result<ValidGenerate, String> {
        match parse_client_message(json).map_err(|e| e.2)? {
            ClientMessage::Generate(g) => validate_generate(g, &LimitsConfig::default()),
            _ => panic!("not a generate"),
        }
    }

    #[test]
    fn each_invalid_field_is_named() {
        let cases = [
            (r#"{"type":"generate","id":"","prompt":"x"}"#, "`id`"),
            (r#"{"type":"generate","id":"a"}"#, "`prompt` or `messages`"),
            (r#"{"type":"generate","id":"a","prompt":"x","messages":[]}"#, "not both"),
            (r#"{"type":"generate","id":"a","messages":[]}"#, "`messages`"),
            (r#"{"type":"generate","id":"a","messages":[{"role":"robot","content":"x"}]}"#, "`messages[0].role`"),
            (r#"{"type":"generate","id":"a","prompt":"x","max_tokens":0}"#, "`max_tokens`"),
            (r#"{"type":"generate","id":"a","prompt":"x","max_tokens":99999999}"#, "limits.max_tokens"),
            (r#"{"type":"generate","id":"a","prompt":"x","max_tokens":-1}"#, "max_tokens"),
            (r#"{"type":"generate","id":"a","prompt":"x","stop":[""]}"#, "`stop[0]`"),
            (r#"{"type":"generate","id":"a","prompt":"x","sampling":{"top_p":1.5}}"#, "`sampling.top_p`"),
            (r#"{"type":"generate","id":"a","prompt":"x","sampling":{"temperature":-1}}"#, "`sampling.temperature`"),
            (r#"{"type":"generate","id":"a","prompt":"x","sampling":{"top_k":-3}}"#, "top_k"),
            (r#"{"type":"generate","id":"a","prompt":"x","sampling":{"tempurature":1}}"#, "tempurature"),
            (r#"{"type":"generate","id":"a","prompt":"x","sampling":[1]}"#, "`sampling` must be an object"),
            (r#"{"type":"generate","id":"a","prompt":"x","logprobs":50}"#, "logprobs"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":""}]}"#, "`plugins[0].name`"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"dry","params":[1]}]}"#, "`plugins[0].params`"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"/tmp/evil.so"}]}"#, "never paths"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"../plugins/dry"}]}"#, "never paths"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"C:\\evil"}]}"#, "never paths"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"libevil.so"}]}"#, "never paths"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"libevil.so.1"}]}"#, "never paths"),
            (r#"{"type":"generate","id":"a","prompt":"x","plugins":[{"name":"evil.dylib"}]}"#, "never paths"),
        ];
        for (json, needle) in cases {
            let err = check(json).expect_err(json);
            assert!(err.contains(needle), "{json}: {err:?} should mention {needle}");
        }
    }

    #[test]
    fn defaults_apply() {
        let v = check(r#"{"type":"generate","id":"a","prompt":"x"}"#).unwrap();
        assert_eq!(v.max_tokens, LimitsConfig::default().default_max_tokens);
        assert_eq!(v.sampling, SamplingParams::default());
    }
}
