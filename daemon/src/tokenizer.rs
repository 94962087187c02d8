//! Tokenizers from a Hugging Face directory (`tokenizer.json` + `tokenizer_config.json`) or
//! from GGUF metadata, behind one [`Tokenizer`] that also knows the special tokens; and
//! [`StreamDecoder`], which turns generated ids into text without splitting a character.
//!
//! A GGUF carries no `tokenizer.json`, only llama.cpp's description of one (tokens, merges,
//! token types, a pre-tokenizer name). [`Tokenizer::from_gguf`] rebuilds the `tokenizers`
//! pipeline that the model's own `tokenizer.json` would have: the pre-tokenizer for each
//! `tokenizer.ggml.pre` is the one Hugging Face ships for that family, and its regex is the one
//! llama.cpp's `llama-vocab.cpp` uses for that name.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{GgufError, GgufFile};

/// Failures while loading a tokenizer or running it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not what it should be (invalid JSON, a tokenizer `tokenizers` refuses).
    #[error("{}: {message}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key of a config file or of GGUF metadata has an unusable value.
    #[error("{}: `{key}` {problem}", .path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// Reading GGUF metadata failed (missing key, wrong type).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` names a tokenizer this module does not build.
    #[error(
        "{}: `tokenizer.ggml.model` is `{model}`, which mlxd cannot build a tokenizer for \
         (only byte-level BPE, `gpt2`; `llama` is SentencePiece)",
        .path.display()
    )]
    UnsupportedModel {
        /// The file.
        path: PathBuf,
        /// The model type it names.
        model: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this module does not know.
    #[error(
        "{}: `tokenizer.ggml.pre` is `{pre}`, a pre-tokenizer mlxd does not know (known: {})",
        .path.display(),
        KNOWN_PRE.join(", ")
    )]
    UnsupportedPre {
        /// The file.
        path: PathBuf,
        /// The name it gives.
        pre: String,
    },
    /// Encoding failed inside `tokenizers`.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// Decoding failed inside `tokenizers`, or an id is outside the vocabulary.
    #[error("decoding failed: {0}")]
    Decode(String),
}

/// A tokenizer plus what generation needs to know about its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    /// Whether `encode(.., add_special = true)` puts BOS first.
    add_bos: bool,
    add_eos: bool,
    /// When true, `tokenizer.json`'s post-processor decides what special tokens to add;
    /// otherwise `add_bos`/`add_eos` do.
    post_processor_adds: bool,
    chat_template: Option<String>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.chat_template.as_ref().map(|t| t.len()))
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face tokenizer: `tokenizer.json`, and `tokenizer_config.json` if given
    /// for the special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token` as strings or
    /// `{"content": ..}` objects), `add_bos_token`/`add_eos_token` and `chat_template` (a string
    /// or a list of `{name, template}`, of which `default` or else the first is taken).
    pub fn from_file(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| TokenizerError::Invalid { path: tokenizer_json.into(), message: e.to_string() })?;
        let vocab_size = inner.get_vocab_size(true);
        let mut tok = Self {
            inner,
            bos_id: None,
            eos_ids: Vec::new(),
            pad_id: None,
            unk_id: None,
            add_bos: false,
            add_eos: false,
            post_processor_adds: true,
            chat_template: None,
            vocab_size,
        };
        if let Some(path) = tokenizer_config {
            let config = read_json(path)?;
            let id_of = |key: &str| -> Result<Option<u32>, TokenizerError> {
                let Some(content) = token_content(&config, key, path)? else { return Ok(None) };
                tok.inner.token_to_id(&content).map(Some).ok_or_else(|| TokenizerError::BadKey {
                    path: path.into(),
                    key: key.into(),
                    problem: format!("is {content:?}, which is not in the vocabulary of {}", tokenizer_json.display()),
                })
            };
            let (bos, eos, pad, unk) =
                (id_of("bos_token")?, id_of("eos_token")?, id_of("pad_token")?, id_of("unk_token")?);
            tok.bos_id = bos;
            tok.eos_ids.extend(eos);
            tok.pad_id = pad;
            tok.unk_id = unk;
            let flag = |key: &str| match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(TokenizerError::BadKey {
                    path: path.into(),
                    key: key.into(),
                    problem: format!("should be true or false, not {other}"),
                }),
            };
            let (add_bos, add_eos) = (flag("add_bos_token")?, flag("add_eos_token")?);
            // An explicit flag wins over the post-processor, as in transformers' Llama tokenizers.
            if add_bos.is_some() || add_eos.is_some() {
                tok.post_processor_adds = false;
                tok.add_bos = add_bos.unwrap_or(false);
                tok.add_eos = add_eos.unwrap_or(false);
            }
            tok.chat_template = chat_template(&config, path)?;
        }
        if tok.post_processor_adds {
            let probe = tok.inner.encode("", true).map_err(|e| TokenizerError::Encode(e.to_string()))?;
            tok.add_bos = tok.bos_id.is_some() && probe.get_ids().first() == tok.bos_id.as_ref();
        }
        if tok.add_bos && tok.bos_id.is_none() {
            return Err(TokenizerError::BadKey {
                path: tokenizer_config.unwrap_or(tokenizer_json).into(),
                key: "add_bos_token".into(),
                problem: "is true, but no `bos_token` is set".into(),
            });
        }
        Ok(tok)
    }

    /// [`Self::from_file`] on a model directory, plus `generation_config.json`'s
    /// `eos_token_id` (a number or a list) as further end-of-sequence ids, and
    /// `chat_template.jinja` when `tokenizer_config.json` has no template.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let config = dir.join("tokenizer_config.json");
        let mut tok = Self::from_file(&dir.join("tokenizer.json"), config.is_file().then_some(config.as_path()))?;
        let generation = dir.join("generation_config.json");
        if generation.is_file() {
            let json = read_json(&generation)?;
            let ids = match json.get("eos_token_id") {
                None | Some(serde_json::Value::Null) => Some(Vec::new()),
                Some(serde_json::Value::Array(items)) => items.iter().map(|v| v.as_u64()).collect(),
                Some(v) => v.as_u64().map(|id| vec![id]),
            };
            let ids = ids.ok_or_else(|| TokenizerError::BadKey {
                path: generation.clone(),
                key: "eos_token_id".into(),
                problem: "should be a token id or a list of token ids".into(),
            })?;
            for id in ids {
                let id = u32::try_from(id).ok().filter(|&id| (id as usize) < tok.vocab_size).ok_or_else(|| {
                    TokenizerError::BadKey {
                        path: generation.clone(),
                        key: "eos_token_id".into(),
                        problem: format!("has {id}, outside the vocabulary of {} tokens", tok.vocab_size),
                    }
                })?;
                if !tok.eos_ids.contains(&id) {
                    tok.eos_ids.push(id);
                }
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.is_file() {
            tok.chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|source| TokenizerError::Io { path: jinja, source })?);
        }
        Ok(tok)
    }

    /// Builds the tokenizer a GGUF describes. Only byte-level BPE (`tokenizer.ggml.model` =
    /// `gpt2`) is supported. Control tokens (type 3) become special added tokens and
    /// user-defined ones (type 4) plain added tokens, so that both are always matched whole, as
    /// llama.cpp does; only control tokens are dropped by `decode(.., skip_special = true)`.
    pub fn from_gguf(meta: &GgufFile) -> Result<Self, TokenizerError> {
        let path = meta.path.clone();
        let bad = |key: &str, problem: String| TokenizerError::BadKey { path: path.clone(), key: key.into(), problem };
        let model = meta.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel { path, model: model.into() });
        }
        let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let family =
            PreFamily::of(pre).ok_or_else(|| TokenizerError::UnsupportedPre { path: path.clone(), pre: pre.into() })?;

        let tokens = meta.get_str_array("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types = match meta.contains("tokenizer.ggml.token_type") {
            true => meta.get_i32_array("tokenizer.ggml.token_type")?,
            false => vec![1; n],
        };
        if types.len() != n {
            return Err(bad("tokenizer.ggml.token_type", format!("has {} entries for {n} tokens", types.len())));
        }
        let mut vocab = Vocab::default();
        for (id, token) in tokens.iter().enumerate() {
            // A token spelled twice keeps its first id, like llama.cpp's text-to-token map.
            vocab.entry(token.clone()).or_insert(id as u32);
        }
        let merges = meta
            .get_str_array("tokenizer.ggml.merges")?
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
                _ => Err(bad(
                    "tokenizer.ggml.merges",
                    format!("entry {i} is {m:?}, not two tokens separated by a space"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(family.ignore_merges())
            .build()
            .map_err(|e| bad("tokenizer.ggml.merges", format!("do not fit the vocabulary: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(family.pre_tokenizer()));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // A "control" token with characters outside the byte-level alphabet (a raw space or
        // newline) is a converter's mislabel, not a marker to cut out of every text; transformers
        // skips those too.
        let alphabet = ByteLevel::alphabet();
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(token, &t)| t == kind && (kind != 3 || token.chars().all(|c| alphabet.contains(&c))))
                .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(&added(3, true));
        inner.add_tokens(&added(4, false));

        let id = |key: &str| -> Result<Option<u32>, TokenizerError> {
            match meta.opt_u32(key)? {
                Some(id) if id as usize >= n => Err(bad(key, format!("is {id}, outside the vocabulary of {n} tokens"))),
                other => Ok(other),
            }
        };
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        // Every id that ends a turn; llama.cpp stops on the same set.
        let mut eos_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(e) = id(key)? {
                if !eos_ids.contains(&e) {
                    eos_ids.push(e);
                }
            }
        }
        let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(family.adds_bos());
        let add_eos = meta.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos_id.is_none() {
            return Err(bad(
                "tokenizer.ggml.add_bos_token",
                "is true, but `tokenizer.ggml.bos_token_id` is not set".into(),
            ));
        }
        if add_eos && eos_ids.is_empty() {
            return Err(bad(
                "tokenizer.ggml.add_eos_token",
                "is true, but `tokenizer.ggml.eos_token_id` is not set".into(),
            ));
        }
        Ok(Self {
            vocab_size: inner.get_vocab_size(true).max(n),
            inner,
            bos_id,
            eos_ids,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            add_bos,
            add_eos,
            post_processor_adds: false,
            chat_template: meta.opt_str("tokenizer.chat_template")?.map(String::from),
        })
    }

    /// Token ids for `text`. Special tokens written in the text (`<|im_start|>`) become their
    /// ids; `add_special` adds BOS (and EOS) as the model's configuration asks.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special && self.post_processor_adds)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special && !self.post_processor_adds {
            if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
                ids.insert(0, bos);
            }
            if let (true, Some(&eos)) = (self.add_eos, self.eos_ids.first()) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Text for `ids`; `skip_special` leaves out special tokens (control tokens, for a GGUF).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::Decode(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The vocabulary entry for `id` as the tokenizer spells it (`Ġthe` for byte-level BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the vocabulary entry spelled `token`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included: the model's logits are at least this wide.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Ids that end generation (possibly several: end of text, end of turn).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The beginning-of-sequence id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The padding id, if set.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The unknown-token id, if set.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// Whether `encode(.., true)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The Jinja chat template shipped with the tokenizer.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.into(), source })?;
    serde_json::from_str(&text)
        .map_err(|e| TokenizerError::Invalid { path: path.into(), message: format!("invalid JSON: {e}") })
}

/// A special token given in `tokenizer_config.json` as `"<s>"` or `{"content": "<s>", ..}`.
fn token_content(config: &serde_json::Value, key: &str, path: &Path) -> Result<Option<String>, TokenizerError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::BadKey {
                path: path.into(),
                key: key.into(),
                problem: "is an object without a string `content`".into(),
            }),
        },
        Some(other) => Err(TokenizerError::BadKey {
            path: path.into(),
            key: key.into(),
            problem: format!("should be a string or an object, not {other}"),
        }),
    }
}

fn chat_template(config: &serde_json::Value, path: &Path) -> Result<Option<String>, TokenizerError> {
    let bad = |problem: &str| TokenizerError::BadKey {
        path: path.into(),
        key: "chat_template".into(),
        problem: problem.into(),
    };
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named = |entry: &serde_json::Value| -> Result<(String, String), TokenizerError> {
                match (entry.get("name").and_then(|n| n.as_str()), entry.get("template").and_then(|t| t.as_str())) {
                    (Some(n), Some(t)) => Ok((n.into(), t.into())),
                    _ => Err(bad("has a list entry without string `name` and `template`")),
                }
            };
            let templates = list.iter().map(named).collect::<Result<Vec<_>, _>>()?;
            let chosen = templates.iter().find(|(n, _)| n == "default").or(templates.first());
            Ok(chosen.map(|(_, t)| t.clone()))
        }
        Some(_) => Err(bad("should be a string or a list of {name, template}")),
    }
}

/// `tokenizer.ggml.pre` values this module knows, grouped as llama.cpp groups them.
pub(crate) const KNOWN_PRE: [&str; 19] = [
    "default",
    "gpt2",
    "gpt-2",
    "mpt",
    "olmo",
    "phi-2",
    "smollm",
    "starcoder",
    "refact",
    "codeshell",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "megrez",
];

/// The `Split` regex of Llama 3's `tokenizer.json` (llama.cpp's `LLAMA3` regex, which spells
/// the case-insensitive contractions out because its engine lacks `(?i:)`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The `Split` regex of Qwen2's `tokenizer.json` (llama.cpp's `QWEN2`): like Llama 3's, but
/// every digit on its own.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone, Copy, PartialEq, Debug)]
enum PreFamily {
    /// GPT-2's regex inside `ByteLevel`. llama.cpp's `default` uses a different, older set of
    /// regexes, but no current converter writes `default`; transformers also reads it as GPT-2.
    Gpt2,
    /// Every digit on its own, then GPT-2's regex: SmolLM and StarCoder's `tokenizer.json`
    /// (`Sequence[Digits(individual_digits), ByteLevel]`); llama.cpp's `\p{N}` split then GPT-2.
    DigitsGpt2,
    /// Llama 3's split (numbers in groups of up to three), merges ignored for whole-vocabulary
    /// words, BOS added.
    Llama3,
    /// Llama 3's split without the merge shortcut or BOS (DBRX, Smaug).
    Llama3Split,
    /// Qwen2's split (single digits).
    Qwen2,
}

impl PreFamily {
    fn of(pre: &str) -> Option<Self> {
        Some(match pre {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "phi-2" => Self::Gpt2,
            "smollm" | "starcoder" | "refact" | "codeshell" => Self::DigitsGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => Self::Llama3,
            "dbrx" | "smaug-bpe" => Self::Llama3Split,
            "qwen2" | "deepseek-r1-qwen" | "megrez" => Self::Qwen2,
            _ => return None,
        })
    }

    fn pre_tokenizer(self) -> PreTokenizerWrapper {
        let split = |regex: &str| -> PreTokenizerWrapper {
            let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                .expect("the built-in split regexes compile");
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]))
        };
        match self {
            Self::Gpt2 => ByteLevel::new(false, true, true).into(),
            Self::DigitsGpt2 => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])),
            Self::Llama3 | Self::Llama3Split => split(LLAMA3_SPLIT),
            Self::Qwen2 => split(QWEN2_SPLIT),
        }
    }

    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }

    fn adds_bos(self) -> bool {
        self == Self::Llama3
    }
}

/// Incremental detokenization: push ids as they are generated, get back the text each one
/// completes.
///
/// Decoding one token at a time is wrong in two ways: a character may span several byte
/// tokens (an emoji is four byte-level tokens), and some decoders depend on context (a
/// SentencePiece `▁` is a space except at the start). So a short window is decoded instead:
/// the last emitted token(s) as context, then the pending ones; what the window adds beyond the
/// context's own text is new. Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back
/// until a later token completes it, or until [`Self::finish`].
///
/// Generic over how the tokenizer is held: `&Tokenizer` for a borrow, `Arc<Tokenizer>` where the
/// decoder outlives the borrow (a sequence in the engine's batch).
pub struct StreamDecoder<T: std::borrow::Borrow<Tokenizer>> {
    tokenizer: T,
    skip_special: bool,
    /// `ids[..read]` were emitted already (context), `ids[read..]` are pending.
    ids: Vec<u32>,
    read: usize,
    /// The decoding of `ids[..read]` on its own.
    context_text: String,
}

impl<T: std::borrow::Borrow<Tokenizer>> StreamDecoder<T> {
    /// A decoder that leaves special tokens out of the text.
    pub fn new(tokenizer: T) -> Self {
        Self::with_special(tokenizer, true)
    }

    /// A decoder that leaves special tokens out if `skip_special`, or writes them out.
    pub fn with_special(tokenizer: T, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, ids: Vec::new(), read: 0, context_text: String::new() }
    }

    /// Adds one id; returns the text it completes (often empty while a character is pending).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = match self.tokenizer.borrow().decode(&self.ids, self.skip_special) {
            Ok(text) => text,
            Err(e) => {
                // Leave the decoder as it was, so one bad id does not poison the stream.
                self.ids.pop();
                return Err(e);
            }
        };
        let start = self.context_text.len();
        if text.len() <= start || text.ends_with('\u{FFFD}') || !text.is_char_boundary(start) {
            return Ok(String::new());
        }
        let new = text[start..].to_string();
        // The tokens just emitted become the context for the next ones.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.context_text = self.tokenizer.borrow().decode(&self.ids, self.skip_special)?;
        Ok(new)
    }

    /// Text still held back (an incomplete character becomes U+FFFD here); resets the decoder.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        let text = self.tokenizer.borrow().decode(&self.ids, self.skip_special)?;
        let start = self.context_text.len();
        let rest = match text.get(start..) {
            Some(rest) if text.len() > start => rest.to_string(),
            _ => String::new(),
        };
        self.ids.clear();
        self.read = 0;
        self.context_text.clear();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests;
