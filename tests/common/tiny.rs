//! A second, very small model for daemon tests: a 2-layer Llama with random weights and a
//! byte-level BPE tokenizer without merges (one token per byte), so it loads in milliseconds,
//! decodes fast on the CPU and turns any text into tokens.

use serde_json::{json, Value};
use std::path::Path;

/// Vocabulary: the 256 bytes, then `<s>` (256) and `</s>` (257).
pub const VOCAB: usize = 258;

/// GPT-2's printable stand-ins for the 256 bytes, as byte-level BPE vocabularies spell them.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut by_byte = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        by_byte[*b as usize] = char::from_u32(*c).unwrap();
    }
    by_byte
}

fn special(id: usize, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// Writes the model (config, random weights, tokenizer, chat template) into `dir`.
pub fn write_tiny_model(dir: &Path) {
    let mut config = super::tiny_config("llama");
    config["vocab_size"] = json!(VOCAB);
    config["max_position_embeddings"] = json!(131072);
    config["bos_token_id"] = json!(256);
    config["eos_token_id"] = json!(257);
    super::write_checkpoint(dir, &config, None);
    let mut vocab = serde_json::Map::new();
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    vocab.insert("<s>".into(), json!(256));
    vocab.insert("</s>".into(), json!(257));
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tokenizer_config = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": true,
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config.to_string()).unwrap();
}
