//! Model configuration in two layers: [`HfConfig`] mirrors `config.json` and tolerates what it
//! does not know; [`ModelArgs`] is the checked form the architectures are built from.

use super::layers::{Llama3Scaling, Quant};
use super::ModelError;
use serde::Deserialize;

/// `config.json` as Hugging Face and mlx-community write it; unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HfConfig {
    /// Selects the architecture (`llama`, `mistral`, `qwen2`, `qwen3`).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: i32,
    /// Number of decoder blocks.
    pub num_hidden_layers: i32,
    /// Query heads.
    pub num_attention_heads: i32,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<i32>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<i32>,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: i32,
    /// Vocabulary size.
    pub vocab_size: i32,
    /// RMS norm epsilon.
    pub rms_norm_eps: Option<f32>,
    /// RoPE base.
    pub rope_theta: Option<f32>,
    /// RoPE scaling (`llama3`, `linear`, or absent).
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the LM head reuses the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    /// Llama's switch for q/k/v/o biases.
    pub attention_bias: Option<bool>,
    /// Context length the model was trained for.
    pub max_position_embeddings: Option<i32>,
    /// MLX-quantized checkpoints (mlx-community) record their quantization here.
    pub quantization: Option<Quant>,
    /// End-of-sequence id(s); `generation_config.json` usually has the authoritative list.
    pub eos_token_id: Option<serde_json::Value>,
}

/// The architectures mlxd implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1-3, SmolLM, and anything else in that layout.
    Llama,
    /// Mistral: the Llama layout (sliding windows are not used by the released dense models).
    Mistral,
    /// Qwen2 / Qwen2.5: biases on q, k and v.
    Qwen2,
    /// Qwen3: RMS norm on q and k per head, no biases.
    Qwen3,
}

impl Arch {
    /// Looks up `model_type`, with aliases.
    pub fn from_model_type(t: &str) -> Option<Arch> {
        Some(match t {
            "llama" | "smollm" | "smollm2" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            _ => return None,
        })
    }
}

/// RoPE variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// No scaling.
    None,
    /// Positions divided by a factor.
    Linear(f32),
    /// Llama 3's frequency-dependent scaling.
    Llama3(Llama3Scaling),
}

/// Checked hyper-parameters.
#[derive(Debug, Clone)]
pub struct ModelArgs {
    /// Architecture.
    pub arch: Arch,
    /// Residual width.
    pub hidden: i32,
    /// Decoder blocks.
    pub layers: i32,
    /// Query heads.
    pub heads: i32,
    /// Key/value heads.
    pub kv_heads: i32,
    /// Per-head width.
    pub head_dim: i32,
    /// MLP hidden width.
    pub intermediate: i32,
    /// Vocabulary size.
    pub vocab: i32,
    /// RMS norm epsilon.
    pub eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// LM head tied to the embedding.
    pub tie_embeddings: bool,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Per-head RMS norm on q and k.
    pub qk_norm: bool,
    /// Model-wide quantization, if any.
    pub quant: Option<Quant>,
    /// Trained context length.
    pub max_position: i32,
}

impl HfConfig {
    /// Checks the values and derives the internal form; errors name the offending key.
    pub fn validate(&self) -> Result<ModelArgs, ModelError> {
        let arch = Arch::from_model_type(&self.model_type).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "model_type `{}` is not supported (supported: llama, mistral, qwen2, qwen3)",
                self.model_type
            ))
        })?;
        let positive = |v: i32, key: &str| {
            if v > 0 { Ok(v) } else { Err(ModelError::Config(format!("`{key}` must be > 0, got {v}"))) }
        };
        let hidden = positive(self.hidden_size, "hidden_size")?;
        let heads = positive(self.num_attention_heads, "num_attention_heads")?;
        let kv_heads = positive(self.num_key_value_heads.unwrap_or(heads), "num_key_value_heads")?;
        if heads % kv_heads != 0 {
            return Err(ModelError::Config(format!(
                "`num_attention_heads` ({heads}) must be a multiple of `num_key_value_heads` ({kv_heads})"
            )));
        }
        let head_dim = positive(self.head_dim.unwrap_or(hidden / heads), "head_dim")?;
        if head_dim % 2 != 0 {
            return Err(ModelError::Config(format!("`head_dim` must be even for RoPE, got {head_dim}")));
        }
        let rope_scaling = parse_rope_scaling(self.rope_scaling.as_ref())?;
        Ok(ModelArgs {
            arch,
            hidden,
            layers: positive(self.num_hidden_layers, "num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            intermediate: positive(self.intermediate_size, "intermediate_size")?,
            vocab: positive(self.vocab_size, "vocab_size")?,
            eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: match arch {
                Arch::Qwen2 => true,
                _ => self.attention_bias.unwrap_or(false),
            },
            o_bias: matches!(arch, Arch::Llama | Arch::Mistral) && self.attention_bias.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            quant: self.quantization,
            max_position: self.max_position_embeddings.unwrap_or(4096),
        })
    }
}

fn parse_rope_scaling(v: Option<&serde_json::Value>) -> Result<RopeScaling, ModelError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(RopeScaling::None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("");
    let num = |key: &str| {
        v.get(key).and_then(|x| x.as_f64()).map(|x| x as f32).ok_or_else(|| {
            ModelError::Config(format!("`rope_scaling.{key}` is required for rope_type `{kind}`"))
        })
    };
    match kind {
        "llama3" => Ok(RopeScaling::Llama3(Llama3Scaling {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        })),
        "linear" => Ok(RopeScaling::Linear(num("factor")?)),
        "default" => Ok(RopeScaling::None),
        other => Err(ModelError::Unsupported(format!("`rope_scaling.rope_type` `{other}` is not supported"))),
    }
}
