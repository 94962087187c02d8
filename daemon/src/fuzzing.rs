//! Fuzzing entry points: one function per parser that sees outside input, each taking arbitrary
//! bytes. The cargo-fuzz targets in `fuzz/` call these, and so does `tests/fuzz_corpus.rs`, which
//! replays every committed seed and regression input on stable Rust; the bodies live here so the
//! two cannot drift apart.
//!
//! Each function must return for any input without panicking, hanging or allocating far beyond
//! the input's size; a parser error is a normal outcome. Where a parser promises something about
//! what it accepted (a tensor lies inside the file, a token id is inside the vocabulary), the
//! function asserts it, so a broken promise is a crash too. None of them needs MLX at run time.
//! `fuzz/README.md` describes the input format of the structured ones.

use std::path::Path;

use crate::chat::{ChatTemplate, Message};
use crate::config::{Config, LimitsConfig};
use crate::gguf::{GgufArray, GgufFile, GgufValue};
use crate::protocol::{parse_client_message, ClientMessage, ErrorCode, ServerMessage};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// The names of the fuzz targets, each the name of a function of this module; `fuzz/seeds/NAME/`
/// and `fuzz/regressions/NAME/` hold its committed inputs.
pub const TARGETS: [&str; 7] = [
    "protocol_frame",
    "config_toml",
    "gguf_header",
    "safetensors_header",
    "gguf_tokenizer",
    "chat_template",
    "openai_request",
];

/// Runs the harness called `target` (one of [`TARGETS`]) on `data`; false for an unknown name.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "protocol_frame" => protocol_frame(data),
        "config_toml" => config_toml(data),
        "gguf_header" => gguf_header(data),
        "safetensors_header" => safetensors_header(data),
        "gguf_tokenizer" => gguf_tokenizer(data),
        "chat_template" => chat_template(data),
        "openai_request" => openai_request(data),
        _ => return false,
    }
    true
}

/// A WebSocket text frame: [`parse_client_message`], then for `generate` [`crate::validation`]
/// under the default limits, and the error event the connection would send back.
pub fn protocol_frame(data: &[u8]) {
    // The WebSocket layer refuses text frames that are not UTF-8 before mlxd sees them.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (id, message) = match parse_client_message(text) {
        Ok(ClientMessage::Generate(g)) => {
            let id = g.id.clone();
            match crate::validation::validate_generate(g, &LimitsConfig::default()) {
                Ok(v) => {
                    assert!(!v.id.is_empty() && v.id.len() <= crate::validation::MAX_ID_BYTES);
                    assert!(v.max_tokens >= 1 && v.max_tokens <= LimitsConfig::default().max_tokens);
                    return;
                }
                Err(message) => (Some(id), message),
            }
        }
        Ok(_) => return,
        Err((id, _, message)) => (id, message),
    };
    assert!(!message.is_empty(), "an error without a message for {text:?}");
    let event = ServerMessage::error(id.as_deref(), ErrorCode::InvalidRequest, message);
    serde_json::to_string(&event).expect("events always serialize");
}

/// An OpenAI-compatible request body (byte 0: bit 0 picks `/v1/completions` over
/// `/v1/chat/completions`; the rest is the JSON body): [`crate::openai::prepare`] under the
/// default limits, and the error object the client would get.
pub fn openai_request(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else { return };
    let endpoint = if selector & 1 == 0 { crate::openai::Endpoint::Chat } else { crate::openai::Endpoint::Completions };
    match crate::openai::prepare(endpoint, &body, "chatcmpl-1", &LimitsConfig::default()) {
        Ok((v, stream, include_usage)) => {
            assert_eq!(v.id, "chatcmpl-1");
            assert!(v.max_tokens >= 1 && v.max_tokens <= LimitsConfig::default().max_tokens);
            assert!(stream || !include_usage, "usage events only come with a stream");
        }
        Err(e) => {
            assert!((400..600).contains(&e.status) && !e.message.is_empty(), "{e:?} for {body}");
            serde_json::to_string(&e.body()).expect("error bodies always serialize");
        }
    }
}

/// `config.toml` text through [`Config::parse`] (TOML, unknown keys, bounds).
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = Config::parse(text, Path::new("config.toml")) {
        assert!(!cfg.models.is_empty());
        assert!(cfg.models.contains_key(cfg.default_model()));
    }
}

/// A GGUF file: [`crate::gguf::parse`]; on success every typed getter on every key, the tensor
/// table's promises, the model hyper-parameters and the tokenizer the metadata describes.
pub fn gguf_header(data: &[u8]) {
    let Ok(file) = crate::gguf::parse(data) else { return };
    for t in &file.tensors {
        let end = file.data_offset + t.offset + t.n_bytes();
        assert!(end <= file.file_len, "tensor `{}` ends at {end}, past the file's {} bytes", t.name, file.file_len);
        let _ = (t.shape(), t.check_loadable());
    }
    let _ = file.check_loadable();
    for (key, _) in file.metadata() {
        let _ = (file.get_u8(key), file.get_u16(key), file.get_u32(key), file.get_u64(key));
        let _ = (file.get_i32(key), file.get_i64(key), file.get_usize(key), file.get_f32(key));
        let _ = (file.get_bool(key), file.get_str(key), file.get_str_array(key));
        let _ = (file.get_i32_array(key), file.get_u32_array(key), file.get_i64_array(key), file.get_f32_array(key));
    }
    let _ = crate::models::gguf_args(&file);
    if let Ok(tok) = Tokenizer::from_gguf(&file) {
        exercise_tokenizer(&tok, "Hello, world! 12345 <|im_end|> 😀");
    }
}

/// A safetensors file: [`crate::models::safetensors::parse`], and that what it accepts lies
/// inside the file.
pub fn safetensors_header(data: &[u8]) {
    let Ok(header) = crate::models::safetensors::parse(data) else { return };
    for t in &header.tensors {
        let (begin, end) = t.data_offsets;
        assert!(begin <= end && header.data_offset + end <= data.len() as u64, "tensor `{}` outside the file", t.name);
    }
}

/// A tokenizer from GGUF metadata ([`Tokenizer::from_gguf`]), built from structured input so
/// that most inputs get past the metadata checks, then encoding, decoding and streaming.
///
/// Byte 0: bits 0-4 pick `tokenizer.ggml.pre` (the known names, then an unknown one), bit 5
/// puts the 256 byte-level tokens first, bits 6 and 7 set `add_bos_token` / `add_eos_token`.
/// Byte 1: bits 0-3 the BOS id (when bit 4 is set), bits 5-7 the EOS id. The rest, as UTF-8
/// (lossy), is split at NUL bytes into the tokens (one per line; a first byte 1-5 makes the
/// token of type 3, 4, 2, 5 or 6 instead of 1), the merges (one per line) and a text to encode.
pub fn gguf_tokenizer(data: &[u8]) {
    let Some((file, input)) = gguf_tokenizer_input(data) else { return };
    let Ok(tok) = Tokenizer::from_gguf(&file) else { return };
    exercise_tokenizer(&tok, &input);
    // Ids as a client's `detokenize` sends them, in range or not.
    let raw: Vec<u32> = input.bytes().map(u32::from).chain([tok.vocab_size() as u32, u32::MAX]).collect();
    let _ = tok.decode(&raw, false);
}

/// The metadata and the text that a [`gguf_tokenizer`] input describes; `None` when it is
/// shorter than its two flag bytes.
pub fn gguf_tokenizer_input(data: &[u8]) -> Option<(GgufFile, String)> {
    let [flags, ids, rest @ ..] = data else { return None };
    let text = String::from_utf8_lossy(rest);
    let mut sections = text.split('\0');
    let (token_lines, merge_lines, input) =
        (sections.next().unwrap_or(""), sections.next().unwrap_or(""), sections.next().unwrap_or(""));

    let mut tokens: Vec<String> = Vec::new();
    if flags & 0x20 != 0 {
        tokens.extend((0..=255u8).map(|b| byte_level_char(b).to_string()));
    }
    let mut types = vec![1i32; tokens.len()];
    for line in token_lines.split('\n') {
        let (kind, token) = match line.as_bytes().first() {
            Some(&b @ 1..=5) => ([3, 4, 2, 5, 6][usize::from(b - 1)], &line[1..]),
            _ => (1, line),
        };
        tokens.push(token.to_string());
        types.push(kind);
    }
    let merges: Vec<String> = merge_lines.split('\n').filter(|m| !m.is_empty()).map(String::from).collect();
    let pre = crate::tokenizer::KNOWN_PRE.get(usize::from(flags & 0x1f)).copied().unwrap_or("no-such-pre");

    let mut meta = vec![
        ("tokenizer.ggml.model".to_string(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(GgufArray::String(tokens))),
        ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(GgufArray::I32(types))),
        ("tokenizer.ggml.merges".to_string(), GgufValue::Array(GgufArray::String(merges))),
        ("tokenizer.ggml.eos_token_id".to_string(), GgufValue::U32(u32::from(ids >> 5))),
        ("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(flags & 0x40 != 0)),
        ("tokenizer.ggml.add_eos_token".to_string(), GgufValue::Bool(flags & 0x80 != 0)),
    ];
    if ids & 0x10 != 0 {
        meta.push(("tokenizer.ggml.bos_token_id".to_string(), GgufValue::U32(u32::from(ids & 0x0f))));
    }
    let file = GgufFile::from_metadata(Path::new("<fuzz>"), meta).expect("the keys are distinct");
    Some((file, input.to_string()))
}

/// Encodes `text` both ways and checks that the ids are in the vocabulary, that they decode,
/// and that streaming them yields the same text as decoding them at once.
fn exercise_tokenizer(tok: &Tokenizer, text: &str) {
    for add_special in [false, true] {
        let Ok(ids) = tok.encode(text, add_special) else { continue };
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= tok.vocab_size()) {
            panic!("encode gave id {bad}, outside the vocabulary of {}", tok.vocab_size());
        }
        for skip_special in [false, true] {
            let whole = tok.decode(&ids, skip_special).expect("ids from encode decode");
            let mut stream = StreamDecoder::with_special(tok, skip_special);
            let mut streamed = String::new();
            for &id in &ids {
                streamed += &stream.push(id).expect("ids from encode decode one by one");
            }
            streamed += &stream.finish().expect("the stream finishes");
            assert_eq!(streamed, whole, "streaming {ids:?} differs from decoding them at once");
        }
    }
}

/// GPT-2's byte-to-character table, in which byte-level BPE vocabularies are spelled.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("below U+0144")
}

/// A chat template and a conversation: the text up to the first NUL byte is the template
/// source, the rest is messages separated by U+001E, each a role letter (`s`ystem,
/// `a`ssistant, `t`ool, anything else user) then the content. Compiled and rendered with
/// [`ChatTemplate`], as the engine does for `messages`.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (source, conversation) = text.split_once('\0').unwrap_or((&text, ""));
    let mut messages: Vec<Message> = conversation
        .split('\u{1e}')
        .filter(|m| !m.is_empty())
        .map(|m| {
            let mut chars = m.chars();
            let role = match chars.next() {
                Some('s') => "system",
                Some('a') => "assistant",
                Some('t') => "tool",
                _ => "user",
            };
            Message { role: role.into(), content: chars.as_str().into() }
        })
        .collect();
    if messages.is_empty() {
        messages.push(Message { role: "user".into(), content: "Hi".into() });
    }
    let Ok(template) = ChatTemplate::new(source, "<s>", "</s>") else { return };
    let _ = template.render(&messages, true);
}
