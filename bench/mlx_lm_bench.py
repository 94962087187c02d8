"""mlx-lm side of mlxd's engine benchmark: the same model directory, prompt ids and token counts.

    python3 bench/mlx_lm_bench.py MODEL_DIR PROMPT_LEN GEN_TOKENS REPEATS SEED [greedy|full]

Prints one JSON object: per-run time to first token, prefill and decode tokens per second, and
peak memory, measured around mlx_lm.generate.generate_step (greedy, no EOS check), which is the
loop `mlx_lm.generate` and `mlx_lm.server` use.
"""
import json
import sys
import time

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler


def main():
    model_dir, plen, gen, repeats, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    variant = sys.argv[6] if len(sys.argv) > 6 else "greedy"
    kwargs = {}
    if variant == "full":
        # The same pipeline as mlxd's `full` variant.
        mx.random.seed(1)
        kwargs["sampler"] = make_sampler(temp=0.7, top_p=0.9, min_p=0.05, top_k=50)
        kwargs["logits_processors"] = make_logits_processors(repetition_penalty=1.1, repetition_context_size=64)
    model, _tok = load(model_dir)
    vocab = model.args.vocab_size
    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, vocab, size=plen).astype(np.int32))
    runs = []
    for r in range(repeats + 1):  # the first run warms up and is dropped
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        first = None
        n = 0
        for token, _ in generate_step(prompt, model, max_tokens=gen, **kwargs):
            if first is None:
                first = time.perf_counter()
            n += 1
        end = time.perf_counter()
        if r == 0:
            continue
        runs.append({
            "ttft_s": first - start,
            "prefill_tps": plen / (first - start),
            "decode_tps": (n - 1) / (end - first),
            "peak_bytes": mx.get_peak_memory(),
        })
    print(json.dumps({"engine": "mlx-lm", "variant": variant, "mlx": mx.__version__, "runs": runs}))


if __name__ == "__main__":
    main()
