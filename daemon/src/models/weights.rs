//! Named tensors of a checkpoint, and the loaders that fill them: Hugging Face safetensors
//! (single or sharded, MLX-quantized or not) and GGUF (through MLX's own loader).
//!
//! Architectures take tensors out by their Hugging Face names (`model.layers.0.self_attn.q_proj`)
//! so loading is a walk; GGUF names are translated to those once, here.

use super::layers::Quant;
use super::ModelError;
use mlx_rs::Array;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, ModelError>;

/// Tensors by name, consumed as the model is built; what is left over is reported.
#[derive(Default)]
pub struct Weights {
    tensors: HashMap<String, Array>,
    /// Per-tensor quantization where it differs from the model-wide one (GGUF mixes Q8_0 and
    /// Q4_1; both come out of MLX's loader with group size 32 and their own bit width).
    per_tensor_quant: HashMap<String, Quant>,
    source: PathBuf,
}

impl Weights {
    /// Wraps an already loaded map.
    pub fn new(tensors: HashMap<String, Array>, source: PathBuf) -> Self {
        Weights { tensors, per_tensor_quant: HashMap::new(), source }
    }

    /// Removes and returns `name`, or an error naming it and the checkpoint.
    pub fn take(&mut self, name: &str) -> Result<Array> {
        self.tensors.remove(name).ok_or_else(|| {
            ModelError::Weights(format!("{}: tensor `{name}` is missing", self.source.display()))
        })
    }

    /// Removes and returns `name` if present.
    pub fn take_opt(&mut self, name: &str) -> Option<Array> {
        self.tensors.remove(name)
    }

    /// True if `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The quantization recorded for the tensor `{prefix}.weight`, if any.
    pub fn quant_of(&self, prefix: &str) -> Option<Quant> {
        self.per_tensor_quant.get(prefix).copied()
    }

    /// Casts every floating-point tensor (norms, quantization scales and biases, dense weights)
    /// to `dtype`; packed integer weights are left alone.
    pub fn cast_floats(&mut self, dtype: mlx_rs::Dtype) -> Result<()> {
        for a in self.tensors.values_mut() {
            if matches!(a.dtype(), mlx_rs::Dtype::Float16 | mlx_rs::Dtype::Bfloat16 | mlx_rs::Dtype::Float32)
                && a.dtype() != dtype
            {
                *a = a.as_dtype(dtype)?;
            }
        }
        Ok(())
    }

    /// Bytes the quantized tensors would take as dense `f32`.
    pub fn dequantized_bytes(&self) -> usize {
        self.per_tensor_quant
            .iter()
            .filter_map(|(prefix, q)| {
                let w = self.tensors.get(&format!("{prefix}.weight"))?;
                let s = w.shape();
                Some(s[0] as usize * s[1] as usize * 32 / q.bits.max(1) as usize * 4)
            })
            .sum()
    }

    /// Replaces every per-tensor-quantized matrix by its dense `f32` form. On the CPU, MLX's
    /// quantized matmul is slower than an OpenBLAS f32 matmul of the same small model (10 vs 21
    /// tok/s for SmolLM2-135M on 2 cores), so small GGUF models are expanded at load there.
    pub fn dequantize_all(&mut self) -> Result<()> {
        let quant = std::mem::take(&mut self.per_tensor_quant);
        for (prefix, q) in quant {
            let w = self.take(&format!("{prefix}.weight"))?;
            let s = self.take(&format!("{prefix}.scales"))?;
            let b = self.take(&format!("{prefix}.biases"))?;
            let dense = mlx_rs::ops::dequantize(&w, &s, &b, q.group_size, q.bits)?.as_dtype(mlx_rs::Dtype::Float32)?;
            dense.eval()?;
            self.tensors.insert(format!("{prefix}.weight"), dense);
        }
        Ok(())
    }

    /// Names not consumed by the model, sorted (ignored buffers such as `rotary_emb.inv_freq`
    /// are dropped first).
    pub fn leftovers(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.tensors.keys().filter(|k| !k.ends_with("rotary_emb.inv_freq")).cloned().collect();
        v.sort();
        v
    }
}

/// Loads every `*.safetensors` file of a Hugging Face directory (the index file, when present,
/// names the shards).
pub fn load_safetensors_dir(dir: &Path) -> Result<Weights> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let shards = shard_names(&text).map_err(|m| ModelError::Config(format!("{}: {m}", index.display())))?;
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    if files.is_empty() {
        return Err(ModelError::Weights(format!("{}: no *.safetensors files", dir.display())));
    }
    let mut tensors = HashMap::new();
    for f in &files {
        // Our own check first: MLX's loader reports a bad header as one opaque exception.
        super::safetensors::read_header(f).map_err(|e| ModelError::Weights(e.to_string()))?;
        let part = Array::load_safetensors(f)
            .map_err(|e| ModelError::Weights(format!("{}: {e}", f.display())))?;
        tensors.extend(part);
    }
    Ok(Weights::new(tensors, dir.to_path_buf()))
}

/// The shard files `model.safetensors.index.json` names in its `weight_map`, sorted and
/// deduplicated. Each must be a plain file name in the model's directory: an index that points
/// elsewhere (`../x`, `/etc/x`) is refused.
pub fn shard_names(index_json: &str) -> std::result::Result<Vec<String>, String> {
    let json: serde_json::Value = serde_json::from_str(index_json).map_err(|e| format!("invalid JSON: {e}"))?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or("no `weight_map` object")?;
    let mut shards = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| format!("`weight_map.{tensor}` must be a file name, not {file}"))?;
        let plain = Path::new(file).file_name().is_some_and(|name| name == file) && file != "." && file != "..";
        if !plain || file.contains('\\') {
            return Err(format!("`weight_map.{tensor}` is {file:?}, not a file name in the model's directory"));
        }
        shards.push(file.to_string());
    }
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Loads a GGUF file's tensors with MLX (which turns Q4_0 / Q4_1 / Q4_K / Q8_0 blocks into
/// MLX-quantized weight / scales / biases with group size 32) and renames them to the Hugging
/// Face Llama layout. Q and K projections are un-permuted: llama.cpp's converter reorders their
/// rows for its interleaved RoPE, while our RoPE is the split-halves layout.
pub fn load_gguf(path: &Path, heads: i32, kv_heads: i32) -> Result<Weights> {
    let raw = mlx_load_gguf(path)?;
    let mut out = Weights { source: path.to_path_buf(), ..Default::default() };
    for (name, array) in raw {
        let Some(hf) = gguf_to_hf(&name) else {
            return Err(ModelError::Weights(format!("{}: unexpected tensor `{name}`", path.display())));
        };
        let array = if hf.contains(".q_proj.") {
            unpermute_rows(&array, heads)?
        } else if hf.contains(".k_proj.") {
            unpermute_rows(&array, kv_heads)?
        } else {
            array
        };
        out.tensors.insert(hf, array);
    }
    // MLX's GGUF loader always uses groups of 32; the bit width follows from the packing.
    let prefixes: Vec<String> =
        out.tensors.keys().filter_map(|k| k.strip_suffix(".scales").map(String::from)).collect();
    for prefix in prefixes {
        let w = &out.tensors[&format!("{prefix}.weight")];
        let s = &out.tensors[&format!("{prefix}.scales")];
        let in_features = s.shape().last().copied().unwrap_or(0) * 32;
        let packed = w.shape().last().copied().unwrap_or(0);
        let bits = if in_features > 0 { packed * 32 / in_features } else { 0 };
        out.per_tensor_quant.insert(prefix, Quant { group_size: 32, bits });
    }
    Ok(out)
}

/// Inverse of llama.cpp's `permute`: rows grouped `(head, pair, half)` back to
/// `(head, half, pair)`. Works on packed quantized rows too, since it only moves whole rows.
pub fn unpermute_rows(a: &Array, heads: i32) -> Result<Array> {
    let shape = a.shape().to_vec();
    let rows = shape[0];
    let rest: Vec<i32> = shape[1..].to_vec();
    let mut split = vec![heads, rows / heads / 2, 2];
    split.extend(&rest);
    let r = a.reshape(&split)?;
    let r = mlx_rs::ops::swap_axes(&r, 1, 2)?;
    Ok(r.reshape(&shape)?)
}

/// GGUF's Llama tensor names to Hugging Face's.
fn gguf_to_hf(name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "token_embd.scales" => Some("model.embed_tokens.scales"),
        "token_embd.biases" => Some("model.embed_tokens.biases"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "output.scales" => Some("lm_head.scales"),
        "output.biases" => Some("lm_head.biases"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

fn mlx_load_gguf(path: &Path) -> Result<Vec<(String, Array)>> {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| ModelError::Weights(format!("{}: path contains a NUL byte", path.display())))?;
    // Make sure mlx-rs has installed its error handler (MLX's default one exits the process).
    let _ = mlx_rs::ops::zeros::<f32>(&[1]);
    let stream = mlx_rs::Stream::new_with_device(&mlx_rs::Device::cpu());
    let mut out = Vec::new();
    // SAFETY: every mlx-c object created here is freed before returning; arrays handed to
    // `Array::from_ptr` are owned by the returned `Array`s.
    unsafe {
        let mut gguf = mlx_sys::mlx_io_gguf_new();
        if mlx_sys::mlx_load_gguf(&mut gguf, cpath.as_ptr(), stream.as_ptr()) != 0 {
            mlx_sys::mlx_io_gguf_free(gguf);
            return Err(ModelError::Weights(format!("{}: MLX could not read this GGUF file", path.display())));
        }
        let mut keys = mlx_sys::mlx_vector_string_new();
        let ok = mlx_sys::mlx_io_gguf_get_keys(&mut keys, gguf) == 0;
        let n = if ok { mlx_sys::mlx_vector_string_size(keys) } else { 0 };
        for i in 0..n {
            let mut key: *mut std::os::raw::c_char = std::ptr::null_mut();
            if mlx_sys::mlx_vector_string_get(&mut key, keys, i) != 0 || key.is_null() {
                continue;
            }
            let name = CStr::from_ptr(key).to_string_lossy().into_owned();
            let mut arr = mlx_sys::mlx_array_new();
            if mlx_sys::mlx_io_gguf_get_array(&mut arr, gguf, key) == 0 {
                out.push((name, Array::from_ptr(arr)));
            } else {
                mlx_sys::mlx_array_free(arr);
            }
        }
        mlx_sys::mlx_vector_string_free(keys);
        mlx_sys::mlx_io_gguf_free(gguf);
    }
    if out.is_empty() {
        return Err(ModelError::Weights(format!("{}: no tensors", path.display())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_stay_in_the_model_directory() {
        let index = r#"{"weight_map":{"a":"model-2.safetensors","b":"model-1.safetensors","c":"model-2.safetensors"}}"#;
        assert_eq!(shard_names(index).unwrap(), ["model-1.safetensors", "model-2.safetensors"]);
        for bad in ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ".", "", "a\\\\b"] {
            let index = format!(r#"{{"weight_map":{{"w":"{bad}"}}}}"#);
            let e = shard_names(&index).unwrap_err();
            assert!(e.contains("`weight_map.w`"), "{bad}: {e}");
        }
        assert!(shard_names(r#"{"weight_map":{"w":3}}"#).unwrap_err().contains("`weight_map.w`"));
        assert!(shard_names(r#"{"metadata":{}}"#).unwrap_err().contains("weight_map"));
        assert!(shard_names("{").unwrap_err().contains("JSON"));
    }
}
