"""Reference token ids for tests/gguf_tokenizer.rs, from an implementation independent of mlxd.

The SmolLM2-135M-Instruct GGUF (the default model, see daemon/src/default_model.rs) is read by
Hugging Face transformers' own GGUF tokenizer conversion (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`, which builds a `tokenizers` tokenizer from the GGUF metadata with its own code),
and every string below is encoded with `tok.encode(text)` (special tokens on, as mlxd's
`encode(text, true)`). The result is written to smollm2_tokenizer_ids.json beside this script.

How it was run (the versions are also recorded in the JSON):

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install transformers==5.24.0 gguf==0.19.0 tokenizers==0.23.3 \
        sentencepiece==0.2.3 numpy==2.4.6
    # transformers' GGUF reader imports torch; the CPU build of torch 2.15.0 was installed
    # from its wheel with --no-deps (no GPU packages are needed to read metadata).
    /tmp/refvenv/bin/python tests/reference/make_tokenizer_ids.py \
        ~/.cache/mlxd/models/SmolLM2-135M-Instruct.Q4_1.gguf

One thing transformers does differently from the model's own tokenizer.json: it has no entry
for `tokenizer.ggml.pre = "smollm"` and so splits digits with GPT-2's regex instead of one digit
at a time (SmolLM2's tokenizer.json and llama.cpp split every digit). The SmolLM2 vocabulary
has no token of two digits nor one of a space and a digit, so both give the same ids for every
string here; the digit cases below would show it if that ever changed.
"""

import hashlib
import importlib.metadata
import json
import os
import sys

from transformers import AutoTokenizer

CASES = [
    "Hello, world! This is a plain ASCII sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "don't won't I'm you're they'll I'd we've",
    "Café déjà vu, naïve façade, Ångström, Straße.",
    "日本語のテキストと中文字符。",
    "Emoji: 😀👍🏽🎉 and a family 👨\u200d👩\u200d👧",
    "e\u0301 a\u0308 n\u0303 o\u0302\u0323 — combining marks",
    "مرحبا بالعالم नमस्ते שלום 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "12345678",
    "π ≈ 3.14159, e ≈ 2.71828, 1,000,000 and 2024-06-01",
    "Hello world! 123",
    "def f(x):\n    if x > 0:\n\treturn x ** 2\n    return -x  # comment\n",
    "a   b\n\n\n  c",
    "\t\ttabs\tand\r\nCRLF\r\n",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
]


def main() -> None:
    gguf = os.path.expanduser(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/mlxd/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with open(gguf, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    versions = {p: importlib.metadata.version(p) for p in ["transformers", "gguf", "tokenizers", "torch"]}
    out = {
        "generated_by": "tests/reference/make_tokenizer_ids.py",
        "gguf": os.path.basename(gguf),
        "gguf_sha256": digest,
        "versions": versions,
        "cases": [{"text": text, "ids": tok.encode(text)} for text in CASES],
    }
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_tokenizer_ids.json")
    # One case per line keeps the file short and its diffs readable.
    text = json.dumps(out, ensure_ascii=False, indent=1)
    cases = ",\n".join("  " + json.dumps(case, ensure_ascii=False) for case in out["cases"])
    text = text[: text.index('"cases": [') + len('"cases": [')] + "\n" + cases + "\n ]\n}\n"
    with open(target, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {len(CASES)} cases to {target}")


if __name__ == "__main__":
    main()
