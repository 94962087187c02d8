"""Independent numpy reference for mlxd's decoder (Llama / Mistral / Qwen2 / Qwen3 layouts).

Reads a Hugging Face style directory (config.json + one model.safetensors, f32 or MLX-quantized)
without any ML framework, and writes the logits of every position of a token sequence.

    python3 transformer_ref.py MODEL_DIR 1,2,3,4 OUT.f32

Everything here follows the published definitions: RMSNorm, rotary embeddings in the
split-halves layout (with Llama 3 and linear scaling), grouped-query causal attention, SwiGLU,
and MLX's affine 4/8-bit quantization (value = scale * q + bias, q packed little-endian in u32).
"""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "U32": np.uint32, "BF16": None}


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            u = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"])
    return out


def dequantize(w, scales, biases, group_size, bits):
    per = 32 // bits
    mask = (1 << bits) - 1
    rows = w.shape[0]
    q = np.zeros((rows, w.shape[1] * per), dtype=np.float32)
    for k in range(per):
        q[:, k::per] = (w >> (bits * k)) & mask
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=1)
    return q * s + b


class Weights:
    def __init__(self, tensors, quant):
        self.t = tensors
        self.quant = quant

    def matrix(self, prefix):
        w = self.t[prefix + ".weight"]
        if prefix + ".scales" in self.t:
            return dequantize(w, self.t[prefix + ".scales"], self.t[prefix + ".biases"],
                              self.quant["group_size"], self.quant["bits"])
        return w.astype(np.float64)

    def get(self, name):
        return self.t[name].astype(np.float64) if name in self.t else None


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_periods(cfg, dims):
    base = cfg.get("rope_theta", 10000.0)
    periods = base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    sc = cfg.get("rope_scaling") or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "llama3":
        f, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        out = []
        for p in periods:
            wl = 2 * np.pi * p
            if wl > old / lo:
                out.append(p * f)
            elif wl < old / hi:
                out.append(p)
            else:
                smooth = (old / wl - lo) / (hi - lo)
                out.append(p / ((1 - smooth) / f + smooth))
        periods = np.array(out)
    elif kind == "linear":
        periods = periods * sc["factor"]
    return periods


def rope(x, positions, periods):
    # x: [heads, T, d]; channel i pairs with i + d/2
    half = x.shape[-1] // 2
    theta = positions[:, None] / periods[None, :]
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def forward(model_dir, tokens):
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = Weights(load_safetensors(f"{model_dir}/model.safetensors"), cfg.get("quantization"))
    mt = cfg["model_type"]
    d = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or d // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    qkv_bias = mt == "qwen2" or cfg.get("attention_bias", False)
    periods = rope_periods(cfg, hd)
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)

    emb = w.matrix("model.embed_tokens")
    h = emb[np.array(tokens)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = rms_norm(h, w.get(f"{p}.input_layernorm.weight"), eps)

        def proj(name, heads):
            y = x @ w.matrix(f"{p}.self_attn.{name}").T
            if qkv_bias:
                y = y + w.get(f"{p}.self_attn.{name}.bias")
            y = y.reshape(T, heads, hd)
            norm = w.get(f"{p}.self_attn.{name[0]}_norm.weight")
            if mt == "qwen3" and name in ("q_proj", "k_proj"):
                y = rms_norm(y, norm, eps)
            return y.transpose(1, 0, 2)

        q, k, v = proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)
        q, k = rope(q, pos, periods), rope(k, pos, periods)
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        scores = scores + np.triu(np.full((T, T), -np.inf), 1)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        o = (probs @ v).transpose(1, 0, 2).reshape(T, nh * hd)
        o = o @ w.matrix(f"{p}.self_attn.o_proj").T
        if mt in ("llama", "mistral") and cfg.get("attention_bias", False):
            o = o + w.get(f"{p}.self_attn.o_proj.bias")
        h = h + o
        x = rms_norm(h, w.get(f"{p}.post_attention_layernorm.weight"), eps)
        g = x @ w.matrix(f"{p}.mlp.gate_proj").T
        u = x @ w.matrix(f"{p}.mlp.up_proj").T
        h = h + ((g / (1 + np.exp(-g))) * u) @ w.matrix(f"{p}.mlp.down_proj").T
    h = rms_norm(h, w.get("model.norm.weight"), eps)
    head = w.matrix("lm_head") if "lm_head.weight" in w.t else emb
    return h @ head.T


if __name__ == "__main__":
    model_dir, toks, out = sys.argv[1], sys.argv[2], sys.argv[3]
    logits = forward(model_dir, [int(t) for t in toks.split(",")])
    logits.astype(np.float32).tofile(out)
