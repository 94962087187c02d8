//! Model loading: Hugging Face directories (safetensors, optionally MLX-quantized) and GGUF
//! files, dispatched to the architecture named by `model_type` (see [`config::Arch`]).

pub mod config;
pub mod cuda;
pub mod fused;
pub mod layers;
pub mod safetensors;
pub mod transformer;
pub mod weights;

use crate::tokenizer::Tokenizer;
use config::{HfConfig, ModelArgs};
use mlx_rs::Dtype;
use std::path::{Path, PathBuf};
pub use transformer::Transformer;

/// Why a model could not be loaded or run. Messages name the file, key or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `config.json` (or GGUF metadata) is malformed or inconsistent.
    #[error("config: {0}")]
    Config(String),
    /// An architecture, format or option mlxd does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor is missing, extra, or of the wrong kind.
    #[error("weights: {0}")]
    Weights(String),
    /// The tokenizer could not be built.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Sampling parameters out of range (the message names the field).
    #[error("{0}")]
    Sampling(crate::sampling::SamplingError),
    /// MLX reported an error while building or running the graph.
    #[error("mlx: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}

/// A model ready to serve: weights on the device, its tokenizer and chat template.
pub struct LoadedModel {
    /// The network.
    pub model: Transformer,
    /// Its tokenizer (shared with the decoders of running sequences).
    pub tokenizer: std::sync::Arc<Tokenizer>,
    /// The Jinja chat template, when the checkpoint ships one.
    pub chat_template: Option<String>,
    /// Token ids that end a generation.
    pub eos_ids: Vec<u32>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// Loads a Hugging Face directory or a `.gguf` file.
pub fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    if path.is_dir() {
        load_hf_dir(path)
    } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        load_gguf(path)
    } else if !path.exists() {
        Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
    } else {
        Err(ModelError::Unsupported(format!(
            "{}: expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file",
            path.display()
        )))
    }
}

/// Reads and checks a directory's `config.json`.
pub fn read_hf_config(dir: &Path) -> Result<(HfConfig, ModelArgs), ModelError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let cfg: HfConfig =
        serde_json::from_str(&text).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    let args = cfg.validate().map_err(|e| match e {
        ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
        other => other,
    })?;
    Ok((cfg, args))
}

fn load_hf_dir(dir: &Path) -> Result<LoadedModel, ModelError> {
    let (cfg, args) = read_hf_config(dir)?;
    let weights = weights::load_safetensors_dir(dir)?;
    let model = Transformer::load(args, weights)?;
    let tok_config = dir.join("tokenizer_config.json");
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), tok_config.is_file().then_some(tok_config.as_path()))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut eos_ids = eos_from_json(cfg.eos_token_id.as_ref());
    let gen_path = dir.join("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen_path) {
        let gen: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config(format!("{}: {e}", gen_path.display())))?;
        let from_gen = eos_from_json(gen.get("eos_token_id"));
        if !from_gen.is_empty() {
            eos_ids = from_gen;
        }
    }
    merge_ids(&mut eos_ids, tokenizer.eos_ids());
    Ok(LoadedModel { model, chat_template: tokenizer.chat_template().map(String::from), tokenizer: tokenizer.into(), eos_ids, source: dir.to_path_buf() })
}

fn eos_from_json(v: Option<&serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => Vec::new(),
    }
}

fn merge_ids(into: &mut Vec<u32>, more: &[u32]) {
    for id in more {
        if !into.contains(id) {
            into.push(*id);
        }
    }
}

/// Largest dense size a quantized GGUF model is expanded to on the CPU.
const CPU_DEQUANTIZE_LIMIT: usize = 2 << 30;

/// The dtype floats are computed in for GGUF checkpoints (whose scales are f16 and norms f32):
/// f16 on a GPU, f32 on the CPU, where half-precision arithmetic is emulated and slow.
fn gguf_compute_dtype() -> Dtype {
    if mlx_rs::Device::default().to_string().contains("gpu") { Dtype::Float16 } else { Dtype::Float32 }
}

fn load_gguf(path: &Path) -> Result<LoadedModel, ModelError> {
    let meta = crate::gguf::read_header(path).map_err(|e| ModelError::Weights(e.to_string()))?;
    meta.check_loadable().map_err(|e| ModelError::Unsupported(e.to_string()))?;
    let args = gguf_args(&meta)?;
    let mut w = weights::load_gguf(path, args.heads, args.kv_heads)?;
    let dtype = gguf_compute_dtype();
    w.cast_floats(dtype)?;
    // On the CPU a small quantized model runs faster expanded to f32 (OpenBLAS) than through
    // MLX's quantized kernels; on a GPU the quantized weights' bandwidth saving wins.
    if dtype == Dtype::Float32 && w.dequantized_bytes() <= CPU_DEQUANTIZE_LIMIT {
        w.dequantize_all()?;
    }
    let model = Transformer::load(args, w)?;
    let tokenizer = Tokenizer::from_gguf(&meta).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let eos_ids = tokenizer.eos_ids().to_vec();
    Ok(LoadedModel { model, chat_template: tokenizer.chat_template().map(String::from), tokenizer: tokenizer.into(), eos_ids, source: path.to_path_buf() })
}

/// Hyper-parameters from GGUF metadata (`{arch}.*` keys), through the same validation as
/// `config.json`.
pub(crate) fn gguf_args(meta: &crate::gguf::GgufFile) -> Result<ModelArgs, ModelError> {
    let cfg_err = |e: crate::gguf::GgufError| ModelError::Config(e.to_string());
    let arch = meta.get_str("general.architecture").map_err(cfg_err)?.to_string();
    let u = |k: &str| meta.get_u32(&format!("{arch}.{k}")).map(|v| v as i32).map_err(cfg_err);
    let f = |k: &str| meta.get_f32(&format!("{arch}.{k}")).map_err(cfg_err);
    let heads = u("attention.head_count")?;
    let hidden = u("embedding_length")?;
    let vocab = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => meta.get_str_array("tokenizer.ggml.tokens").map_err(cfg_err)?.len() as i32,
    };
    let has_output = meta.tensor("output.weight").is_some();
    let cfg = HfConfig {
        model_type: arch.clone(),
        hidden_size: hidden,
        num_hidden_layers: u("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(u("attention.head_count_kv").unwrap_or(heads)),
        head_dim: u("attention.key_length").ok().or(u("rope.dimension_count").ok()),
        intermediate_size: u("feed_forward_length")?,
        vocab_size: vocab,
        rms_norm_eps: Some(f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5)),
        rope_theta: Some(f("rope.freq_base").unwrap_or(10_000.0)),
        tie_word_embeddings: Some(!has_output),
        max_position_embeddings: u("context_length").ok(),
        ..Default::default()
    };
    if !matches!(arch.as_str(), "llama" | "mistral") {
        return Err(ModelError::Unsupported(format!(
            "GGUF architecture `{arch}`: mlxd reads Llama-layout GGUF files (llama, mistral); use a Hugging Face directory for others"
        )));
    }
    cfg.validate()
}
