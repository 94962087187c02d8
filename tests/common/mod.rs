//! Helpers shared by the integration tests: deterministic numbers and tiny random checkpoints.
#![allow(dead_code)]

pub mod daemon;
pub mod tiny;

use mlx_rs::{Array, Dtype};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// A deterministic pseudo-random sequence in [-1, 1).
pub fn pseudo(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(0x9e37_79b9);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A tiny config of the given architecture (2 layers, width 64, 4 heads over 2 KV heads).
pub fn tiny_config(model_type: &str) -> Value {
    let mut c = json!({
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 97,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "max_position_embeddings": 256
    });
    match model_type {
        "llama" => {
            c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
            c["rope_theta"] = json!(500000.0);
        }
        "qwen2" => c["tie_word_embeddings"] = json!(true),
        "qwen3" => {
            c["head_dim"] = json!(32);
            c["tie_word_embeddings"] = json!(true);
        }
        _ => {}
    }
    c
}

/// Writes `config.json` and `model.safetensors` with random weights for `config` into `dir`.
/// With `quant`, every linear and embedding matrix is MLX-quantized (group 32, that many bits).
pub fn write_checkpoint(dir: &Path, config: &Value, quant: Option<i32>) {
    let c = |k: &str| config[k].as_i64().unwrap() as i32;
    let (d, layers, h, kv, inter, vocab) = (
        c("hidden_size"),
        c("num_hidden_layers"),
        c("num_attention_heads"),
        c("num_key_value_heads"),
        c("intermediate_size"),
        c("vocab_size"),
    );
    let hd = config["head_dim"].as_i64().map(|v| v as i32).unwrap_or(d / h);
    let mt = config["model_type"].as_str().unwrap();
    let mut seed = 1u32;
    let mut t: HashMap<String, Array> = HashMap::new();
    let mut put = |name: String, shape: &[i32], scale: f32, offset: f32| {
        seed += 1;
        let n: i32 = shape.iter().product();
        let v: Vec<f32> = pseudo(n as usize, seed).iter().map(|x| x * scale + offset).collect();
        t.insert(name, Array::from_slice(&v, shape));
    };
    put("model.embed_tokens.weight".into(), &[vocab, d], 1.0, 0.0);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[d], 0.2, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[d], 0.2, 1.0);
        put(format!("{p}.self_attn.q_proj.weight"), &[h * hd, d], 0.25, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[kv * hd, d], 0.25, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv * hd, d], 0.25, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[d, h * hd], 0.25, 0.0);
        if mt == "qwen2" {
            put(format!("{p}.self_attn.q_proj.bias"), &[h * hd], 0.5, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), &[kv * hd], 0.5, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), &[kv * hd], 0.5, 0.0);
        }
        if mt == "qwen3" {
            put(format!("{p}.self_attn.q_norm.weight"), &[hd], 0.2, 1.0);
            put(format!("{p}.self_attn.k_norm.weight"), &[hd], 0.2, 1.0);
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[inter, d], 0.25, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[inter, d], 0.25, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[d, inter], 0.25, 0.0);
    }
    put("model.norm.weight".into(), &[d], 0.2, 1.0);
    if !config["tie_word_embeddings"].as_bool().unwrap_or(false) {
        put("lm_head.weight".into(), &[vocab, d], 0.5, 0.0);
    }
    let mut config = config.clone();
    if let Some(bits) = quant {
        let names: Vec<String> = t.keys().filter(|k| k.ends_with(".weight") && t[*k].ndim() == 2).cloned().collect();
        for name in names {
            let w = t.remove(&name).unwrap();
            let (q, s, b) = mlx_rs::ops::quantize(&w, 32, bits).unwrap();
            let prefix = name.strip_suffix(".weight").unwrap();
            t.insert(name.clone(), q);
            t.insert(format!("{prefix}.scales"), s);
            t.insert(format!("{prefix}.biases"), b);
        }
        config["quantization"] = json!({"group_size": 32, "bits": bits});
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let entries: Vec<(String, Array)> = t.into_iter().collect();
    Array::save_safetensors(entries.iter().map(|(k, v)| (k.as_str(), v)), None, dir.join("model.safetensors")).unwrap();
}

/// Reads back f32 values a reference script wrote.
pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// `max |a - b| / max |b|`: relative error that near-zero logits do not blow up.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let num = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let den = want.iter().map(|b| b.abs()).fold(0.0, f32::max);
    num / den.max(1e-12)
}

/// An array's values as f32.
pub fn to_vec(a: &Array) -> Vec<f32> {
    let a = a.as_dtype(Dtype::Float32).unwrap();
    a.eval().unwrap();
    a.as_slice::<f32>().to_vec()
}
