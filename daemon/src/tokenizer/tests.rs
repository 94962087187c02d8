//! Unit tests of `tokenizer.rs`.
use super::*;
use crate::gguf::{GgufArray, GgufValue};

/// GPT-2's byte-to-character table, which byte-level BPE vocabularies are spelled in.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// Byte-level metadata: the 256 bytes, a few merges, a control and a user-defined token.
fn gguf_meta(extra: Vec<(&str, GgufValue)>) -> Vec<(String, GgufValue)> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![1; 256];
    let merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "Ġ"), ("1", "2")];
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    for (token, kind) in [("<|im_end|>", 3), ("<think>", 4), ("x y", 3)] {
        tokens.push(token.into());
        types.push(kind);
    }
    let im_end = GgufValue::U32(261);
    let mut meta = vec![
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), GgufValue::Array(GgufArray::String(tokens))),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(GgufArray::I32(types))),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(GgufArray::String(merges.iter().map(|(a, b)| format!("{a} {b}")).collect())),
        ),
        ("tokenizer.ggml.eos_token_id".into(), im_end.clone()),
        ("tokenizer.ggml.bos_token_id".into(), im_end),
        ("tokenizer.chat_template".into(), GgufValue::String("{{ messages }}".into())),
    ];
    for (key, value) in extra {
        meta.retain(|(k, _)| k != key);
        meta.push((key.into(), value));
    }
    meta
}

fn gguf_tokenizer(extra: Vec<(&str, GgufValue)>) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&GgufFile::from_metadata(Path::new("t.gguf"), gguf_meta(extra)).unwrap())
}

const TEXTS: [&str; 8] = [
    "the theme",
    "Emoji 😀👍🏽 family 👨\u{200d}👩\u{200d}👧!",
    "日本語と中文",
    "e\u{301}a\u{308}n\u{303} combining",
    "fn main() {\n    let x  =  1;\n\tif x {\n        return;\n    }\n}\n",
    "a   b\n\n\n  c  ",
    "  digits 3.14159 and 12345678",
    "<|im_end|><think>ok",
];

fn streamed(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> String {
    let mut stream = StreamDecoder::with_special(tok, skip_special);
    let mut out = String::new();
    for &id in ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} splits a character");
        out += &piece;
    }
    out + &stream.finish().unwrap()
}

#[test]
fn gguf_byte_level_round_trips_and_streams() {
    let tok = gguf_tokenizer(vec![]).unwrap();
    let (im_end, think) = (tok.token_to_id("<|im_end|>").unwrap(), tok.token_to_id("<think>").unwrap());
    assert_eq!((tok.vocab_size(), im_end, think), (264, 261, 262));
    assert_eq!((tok.bos_id(), tok.eos_ids(), tok.add_bos()), (Some(im_end), &[im_end][..], false));
    assert_eq!(tok.chat_template(), Some("{{ messages }}"));
    // Merges apply, the control and user-defined tokens stay whole, and digits stay single
    // under SmolLM's pre-tokenizer although a merge would join them.
    let the = tok.token_to_id("Ġthe").unwrap();
    assert_eq!(tok.encode(" the", false).unwrap(), [the]);
    assert_eq!(tok.encode("<|im_end|><think>", false).unwrap(), [im_end, think]);
    // A control token spelled with a raw space is a mislabel and not matched in text.
    assert_eq!(tok.encode("x y", false).unwrap(), [u32::from(b'x'), 32, u32::from(b'y')]);
    assert_eq!(tok.encode("12", false).unwrap(), [u32::from(b'1'), u32::from(b'2')]);
    let gpt2 = gguf_tokenizer(vec![("tokenizer.ggml.pre", GgufValue::String("gpt2".into()))]).unwrap();
    assert_eq!(gpt2.encode("12", false).unwrap(), [gpt2.token_to_id("12").unwrap()]);
    for text in TEXTS {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        for skip in [false, true] {
            assert_eq!(streamed(&tok, &ids, skip), tok.decode(&ids, skip).unwrap(), "{text:?}");
        }
    }
    // Only control tokens are special.
    assert_eq!(tok.decode(&[im_end, think], true).unwrap(), "<think>");
    assert!(tok.decode(&[264], false).unwrap_err().to_string().contains("token id 264 is outside"));
}

#[test]
fn stream_holds_back_incomplete_characters() {
    let tok = gguf_tokenizer(vec![]).unwrap();
    let ids = tok.encode("😀x", false).unwrap();
    assert_eq!(ids.len(), 5, "four byte tokens and x");
    let mut stream = StreamDecoder::new(&tok);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(pieces, ["", "", "", "😀", "x"]);
    // A character never completed comes out as U+FFFD at the end, not before.
    let mut stream = StreamDecoder::new(&tok);
    assert_eq!(stream.push(ids[0]).unwrap(), "");
    assert!(stream.push(100_000).is_err());
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
}

#[test]
fn add_bos_follows_metadata_and_pre_tokenizer() {
    let tok = gguf_tokenizer(vec![("tokenizer.ggml.add_bos_token", GgufValue::Bool(true))]).unwrap();
    assert_eq!(tok.encode("he", true).unwrap()[0], 261);
    assert_eq!(tok.encode("he", false).unwrap(), [tok.token_to_id("he").unwrap()]);
    // Llama 3's pre-tokenizer adds BOS unless the file says otherwise.
    let tok = gguf_tokenizer(vec![("tokenizer.ggml.pre", GgufValue::String("llama-bpe".into()))]).unwrap();
    assert!(tok.add_bos());
    let twelve = tok.token_to_id("12").unwrap();
    assert_eq!(tok.encode(" the 1234", true).unwrap(), [261, tok.token_to_id("Ġthe").unwrap(), 32, twelve, 51, 52]);
    let tok = gguf_tokenizer(vec![("tokenizer.ggml.pre", GgufValue::String("qwen2".into()))]).unwrap();
    assert!(!tok.add_bos());
    for text in TEXTS {
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text);
    }
}

#[test]
fn gguf_errors_name_the_key() {
    let msg = |extra| gguf_tokenizer(extra).unwrap_err().to_string();
    assert_eq!(
        msg(vec![("tokenizer.ggml.model", GgufValue::String("llama".into()))]),
        "t.gguf: `tokenizer.ggml.model` is `llama`, which mlxd cannot build a tokenizer for \
         (only byte-level BPE, `gpt2`; `llama` is SentencePiece)"
    );
    assert!(msg(vec![("tokenizer.ggml.pre", GgufValue::String("tekken".into()))])
        .starts_with("t.gguf: `tokenizer.ggml.pre` is `tekken`, a pre-tokenizer mlxd does not know"));
    assert_eq!(
        msg(vec![("tokenizer.ggml.eos_token_id", GgufValue::U32(5000))]),
        "t.gguf: `tokenizer.ggml.eos_token_id` is 5000, outside the vocabulary of 264 tokens"
    );
    let merges = GgufValue::Array(GgufArray::String(vec!["Ġt".into()]));
    assert!(msg(vec![("tokenizer.ggml.merges", merges)]).contains("`tokenizer.ggml.merges` entry 0 is \"Ġt\""));
    let merges = GgufValue::Array(GgufArray::String(vec!["x y".into()]));
    assert!(msg(vec![("tokenizer.ggml.merges", merges)]).contains("do not fit the vocabulary"));
    assert_eq!(
        msg(vec![("tokenizer.ggml.tokens", GgufValue::U32(1))]),
        "t.gguf: metadata key `tokenizer.ggml.tokens` has type u32, expected an array of string"
    );
}

#[test]
fn hugging_face_files_give_the_same_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_tokenizer(vec![]).unwrap();
    let json = dir.path().join("tokenizer.json");
    gguf.inner().save(&json, false).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    let write = |value: serde_json::Value| std::fs::write(&config, value.to_string()).unwrap();
    write(serde_json::json!({
        "bos_token": "<|im_end|>",
        "eos_token": {"content": "<|im_end|>", "special": true},
        "pad_token": null,
        "add_bos_token": true,
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }));
    let tok = Tokenizer::from_file(&json, Some(&config)).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_ids(), tok.pad_id(), tok.add_bos()), (Some(261), &[261][..], None, true));
    assert_eq!(tok.chat_template(), Some("D"));
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, gguf.encode(text, false).unwrap());
        assert_eq!(tok.encode(text, true).unwrap()[1..], ids);
    }

    write(serde_json::json!({"eos_token": "<missing>"}));
    let e = Tokenizer::from_file(&json, Some(&config)).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "{}: `eos_token` is \"<missing>\", which is not in the vocabulary of {}",
            config.display(),
            json.display()
        )
    );
    write(serde_json::json!({"chat_template": 3}));
    assert!(Tokenizer::from_file(&json, Some(&config))
        .unwrap_err()
        .to_string()
        .contains("`chat_template` should be"));

    // A directory: generation_config.json adds end-of-turn ids, chat_template.jinja a template.
    write(serde_json::json!({"eos_token": "<|im_end|>"}));
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [261, 262]}"#).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!((tok.eos_ids(), tok.chat_template()), (&[261, 262][..], Some("J")));
}

/// A Llama-2-style SentencePiece tokenizer.json: `▁` for spaces, bytes as `<0xNN>` tokens,
/// and a decoder that strips the first space, so a token's text depends on what precedes it.
fn sentencepiece_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    let pieces =
        ["▁", "a", "b", "c", "e", "h", "l", "o", "t", "▁t", "he", "▁the", "ll", "▁h", "▁he", "▁hell", "▁hello"];
    for (i, p) in pieces.iter().enumerate() {
        vocab.insert(p.to_string(), (259 + i).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab,
            "merges": ["▁ t", "▁ h", "h e", "▁t he", "l l", "▁h e", "▁he ll", "▁hell o"]}
    })
}

#[test]
fn stream_handles_byte_fallback_and_context_dependent_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokenizer.json");
    std::fs::write(&json, sentencepiece_json().to_string()).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, r#"{"bos_token": "<s>", "eos_token": "</s>"}"#).unwrap();
    let tok = Tokenizer::from_file(&json, Some(&config)).unwrap();
    // No add_bos_token: the post-processor's BOS is detected.
    assert!(tok.add_bos());
    let hello = tok.token_to_id("▁hello").unwrap();
    assert_eq!(tok.encode("hello the", true).unwrap()[..2], [1, hello]);
    for text in ["hello the 😀 théâtre", " leading  space", "日本 語", "e\u{301}\n\tx", "hello"] {
        let ids = tok.encode(text, true).unwrap();
        assert!(ids.iter().any(|&id| (3..259).contains(&id)) || text == "hello", "{text:?} uses byte tokens");
        assert_eq!(streamed(&tok, &ids, true), tok.decode(&ids, true).unwrap(), "{text:?}");
    }
}
