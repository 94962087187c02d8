#!/usr/bin/env python3
"""Writes the committed seed inputs of the fuzz targets into fuzz/seeds/<target>/.

Seeds are small valid inputs, one per feature a parser handles, so that libFuzzer starts from
the interesting part of the input space instead of rediscovering the formats. Run it again after
changing it (the files are committed; the replay test tests/fuzz_corpus.rs reads them):

    python3 fuzz/make_seeds.py
"""

import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(ROOT, "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# protocol_frame: one of each message type, and the fields of `generate`.
def protocol():
    msgs = {
        "generate_prompt": {"type": "generate", "id": "a", "prompt": "Hello", "max_tokens": 8},
        "generate_messages": {
            "type": "generate",
            "id": "b",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "stop": ["\n\n", "User:"],
            "logprobs": 3,
        },
        "generate_sampling": {
            "type": "generate",
            "id": "c",
            "prompt": "x",
            "sampling": {
                "temperature": 0.7,
                "top_k": 40,
                "top_p": 0.9,
                "min_p": 0.05,
                "typical_p": 1.0,
                "repetition_penalty": 1.1,
                "repetition_context_size": 64,
                "presence_penalty": 0.5,
                "frequency_penalty": -0.5,
                "seed": 7,
                "logit_bias": {"13": -100, "42": 2.5},
            },
        },
        "generate_plugins": {
            "type": "generate",
            "id": "d",
            "model": "default",
            "prompt": "x",
            "plugins": [{"name": "dry", "params": {"multiplier": 0.8, "base": 1.75}}, {"name": "mirostat"}],
        },
        "cancel": {"type": "cancel", "id": "a"},
        "tokenize": {"type": "tokenize", "id": "t", "text": "Hello world", "add_special": True},
        "detokenize": {"type": "detokenize", "id": "u", "model": "m", "tokens": [1, 2, 3]},
        "models": {"type": "models", "id": "m"},
        "load": {"type": "load", "id": "l", "model": "m"},
        "unload": {"type": "unload", "id": "l", "model": "m"},
        "plugins": {"type": "plugins", "id": "p"},
        "reload_plugins": {"type": "reload_plugins", "id": "r"},
        "status": {"type": "status", "id": "s"},
    }
    for name, m in msgs.items():
        write("protocol_frame", name + ".json", json.dumps(m))


# ---------------------------------------------------------------------------------------------
# config_toml: the shipped config.toml and a few small ones.
def config():
    shutil.copy(os.path.join(ROOT, "..", "config.toml"), os.path.join(SEEDS, "config_toml", "shipped.toml"))
    write(
        "config_toml",
        "small.toml",
        '[server]\nlisten = "127.0.0.1:0"\nauth = false\nallowed_origins = ["vscode-webview://x"]\n'
        'unix_socket = "/tmp/mlxd.sock"\n\n[limits]\nmax_batch = 4\nmax_tokens = 64\ndefault_max_tokens = 16\n\n'
        '[engine]\nprefill_chunk = 128\nprompt_cache_mb = 0\n\n[plugins]\ndirs = ["/opt/mlxd/plugins"]\n\n'
        '[models.smol]\npath = "default"\npreload = true\n\n[models."qwen3:0.6b"]\npath = "/models/qwen3"\n'
        "keep_alive_s = 0\n",
    )
    write("config_toml", "inline_tables.toml", 'models = { a = { path = "x.gguf" } }\nserver = { listen = "[::1]:7878" }\n')


# ---------------------------------------------------------------------------------------------
# GGUF: every value type, nested arrays, a Llama header with a small tokenizer, three tensors.
def gguf_string(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_value(t, v):
    fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
    if t == 8:
        return gguf_string(v)
    if t == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gguf_value(et, x) for x in items)
    return struct.pack(fmt[t], v)


def gguf(kvs, tensors, data_len, alignment=32):
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, t, v in kvs:
        out += gguf_string(key) + struct.pack("<I", t) + gguf_value(t, v)
    for name, dims, ggml_type, offset in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + b"\x11" * data_len


def tokenizer_kvs():
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "H", "e", "l", "o", "Ġ", "w", "r", "d", "1", "2",
              "!", "ll", "Ġw", "He", "llo", "Hello", "<think>"]
    types = [3, 3, 3] + [1] * 16 + [4]
    merges = ["l l", "Ġ w", "H e", "ll o", "He llo"]
    return [
        ("tokenizer.ggml.model", 8, "gpt2"),
        ("tokenizer.ggml.pre", 8, "smollm"),
        ("tokenizer.ggml.tokens", 9, (8, tokens)),
        ("tokenizer.ggml.token_type", 9, (5, types)),
        ("tokenizer.ggml.merges", 9, (8, merges)),
        ("tokenizer.ggml.bos_token_id", 4, 1),
        ("tokenizer.ggml.eos_token_id", 4, 2),
        ("tokenizer.ggml.add_bos_token", 7, 0),
        ("tokenizer.chat_template", 8, "{% for m in messages %}{{ m.content }}{% endfor %}"),
    ]


def ggufs():
    llama = [
        ("general.architecture", 8, "llama"),
        ("general.alignment", 4, 32),
        ("llama.block_count", 4, 1),
        ("llama.embedding_length", 4, 64),
        ("llama.feed_forward_length", 4, 128),
        ("llama.attention.head_count", 4, 4),
        ("llama.attention.head_count_kv", 4, 2),
        ("llama.context_length", 4, 2048),
        ("llama.rope.freq_base", 6, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
        ("llama.vocab_size", 4, 20),
    ] + tokenizer_kvs()
    tensors = [("token_embd.weight", [64, 20], 8, 0), ("output_norm.weight", [64], 0, 1376),
               ("blk.0.attn_q.weight", [256, 1], 12, 1632)]
    write("gguf_header", "llama_tokenizer.gguf", gguf(llama, tensors, 1632 + 144))
    every_type = [
        ("u8", 0, 255), ("i8", 1, -128), ("u16", 2, 65535), ("i16", 3, -1), ("u32", 4, 7), ("i32", 5, -7),
        ("f32", 6, 0.5), ("bool", 7, 1), ("string", 8, "héllo"), ("u64", 10, 2**64 - 1), ("i64", 11, -(2**63)),
        ("f64", 12, 1e300), ("array.f32", 9, (6, [1.0, -2.0])), ("array.u64", 9, (10, [1, 2, 3])),
        ("array.nested", 9, (9, [(4, [1, 2]), (8, ["a", ""])])), ("array.bool", 9, (7, [0, 1])),
        ("array.empty", 9, (8, [])),
    ]
    types = [("f16", [2, 2], 1), ("bf16", [4], 30), ("q4_0", [32], 2), ("q4_1", [32], 3), ("i8", [3], 24)]
    t, off = [], 0
    for name, dims, gt in types:
        t.append((name, dims, gt, off))
        off += 64
    write("gguf_header", "every_type.gguf", gguf(every_type, t, off, alignment=32))
    write("gguf_header", "empty.gguf", gguf([], [], 0))


# ---------------------------------------------------------------------------------------------
# safetensors: as MLX writes it, as Hugging Face writes it (padded), an MLX-quantized layer.
def safetensors(header, data_len):
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"\0" * data_len


def safetensors_seeds():
    write("safetensors_header", "mlx.safetensors", safetensors({
        "__metadata__": {"format": "mlx"},
        "model.norm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]},
        "model.embed_tokens.weight": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [32, 96]},
    }, 96))
    write("safetensors_header", "quantized.safetensors", safetensors({
        "l.weight": {"dtype": "U32", "shape": [2, 4], "data_offsets": [0, 32]},
        "l.scales": {"dtype": "F16", "shape": [2, 1], "data_offsets": [32, 36]},
        "l.biases": {"dtype": "F16", "shape": [2, 1], "data_offsets": [36, 40]},
        "flag": {"dtype": "BOOL", "shape": [], "data_offsets": [40, 41]},
        "empty": {"dtype": "I64", "shape": [0, 3], "data_offsets": [41, 41]},
    }, 41))
    write("safetensors_header", "hf.safetensors", safetensors({
        "__metadata__": {"format": "pt"},
        "lm_head.weight": {"dtype": "F16", "shape": [3, 2], "data_offsets": [0, 12]},
    }, 12))


# ---------------------------------------------------------------------------------------------
# gguf_tokenizer: flags, ids, then tokens \0 merges \0 text (see mlxd::fuzzing::gguf_tokenizer).
def tokenizer_seed(flags, ids, tokens, merges, text):
    return bytes([flags, ids]) + "\n".join(tokens).encode() + b"\0" + "\n".join(merges).encode() + b"\0" + text.encode()


def tokenizer_seeds():
    merges = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "1 2", "i n", "Ġ in"]
    extra = ["Ġt", "he", "Ġthe", "ĠĠ", "12", "in", "Ġin", "\x01<|im_end|>", "\x02<think>", "\x01x y"]
    # pre index 6 = smollm, byte alphabet on, BOS 2 set, EOS 1.
    write("gguf_tokenizer", "smollm.bin", tokenizer_seed(0x20 | 6, 0x10 | 2 | (1 << 5), extra, merges,
                                                        "the theme <|im_end|> 123 <think>x y 😀"))
    # llama3 (index 10) with add_bos.
    write("gguf_tokenizer", "llama3.bin", tokenizer_seed(0x20 | 0x40 | 10, 0x10 | 5, extra, merges,
                                                        "It's 12345 in the   end\n\n"))
    # qwen2 (index 16), add_eos, no byte alphabet: characters outside the vocabulary.
    write("gguf_tokenizer", "qwen2_small.bin", tokenizer_seed(0x80 | 16, 3 << 5, ["a", "b", "ab", "\x01<|e|>"],
                                                             ["a b"], "abab c <|e|>"))
    write("gguf_tokenizer", "gpt2.bin", tokenizer_seed(0x20, 0, [], [], "plain \t text\r\n"))


# ---------------------------------------------------------------------------------------------
# chat_template: real templates (SmolLM2's ChatML, a Llama 3 and a Mistral style) and messages.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{- bos_token }}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Today Date: \" + strftime_now(\"%d %b %Y\") + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PYFUNCS = (
    "{% for m in messages %}{{ m.role.upper() }}: {{ m.content.replace('a', 'b').split(' ')|join(',') }}"
    "{% if m.content.startswith('x') %}{{ m.content|length }}{% endif %}{{ loop.index }}\n"
    "{% endfor %}{{ messages|tojson }}{{ range(3)|list }}{% set ns = namespace(n=0) %}{{ ns.n }}"
)


def chat_seeds():
    conv = "\0" + "\x1e".join(["sYou are terse.", "uHello", "aHi there", "uWhat is 2+2?"])
    write("chat_template", "chatml.jinja", CHATML + conv)
    write("chat_template", "llama3.jinja", LLAMA3 + conv)
    write("chat_template", "mistral.jinja", MISTRAL + "\0" + "\x1e".join(["uHi", "aHello", "u  x  "]))
    write("chat_template", "pyfuncs.jinja", PYFUNCS + "\0" + "\x1e".join(["ua b", "tx y"]))


def openai_seeds():
    # Byte 0: bit 0 picks /v1/completions; the rest is the JSON body.
    chat = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
        ],
        "max_completion_tokens": 16,
        "stop": ["\n", "User:"],
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "logit_bias": {"42": -100},
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "user": "u",
        "top_k": 40,
        "plugins": [{"name": "dry", "params": {"base": 2}}],
    }
    write("openai_request", "chat.json", b"\x00" + json.dumps(chat).encode())
    write("openai_request", "chat_refused.json", b"\x00" + json.dumps({"messages": [], "n": 2, "tools": []}).encode())
    completion = {"prompt": ["Once upon a time"], "max_tokens": 8, "logprobs": None, "echo": False, "stop": "."}
    write("openai_request", "completion.json", b"\x01" + json.dumps(completion).encode())


def main():
    if os.path.isdir(SEEDS):
        shutil.rmtree(SEEDS)
    os.makedirs(os.path.join(SEEDS, "config_toml"))
    protocol()
    config()
    ggufs()
    safetensors_seeds()
    tokenizer_seeds()
    chat_seeds()
    openai_seeds()


if __name__ == "__main__":
    main()
