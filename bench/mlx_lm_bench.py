"""mlx-lm side of mlxd's engine benchmark: the same model directory, prompt ids and token counts.

    python3 bench/mlx_lm_bench.py MODEL_DIR PROMPT_LEN GEN_TOKENS REPEATS SEED [greedy,full]

Prints one JSON object: per variant, per-run time to first token, prefill and decode tokens per
second, the median time between tokens, and peak memory, measured around
mlx_lm.generate.generate_step (no EOS check), which is the loop `mlx_lm.generate` and
`mlx_lm.server` use. Several variants run interleaved, the order rotating each round, as mlxd's do.
"""
import json
import sys
import time

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler


def variant_kwargs(variant):
    if variant == "greedy":
        return {}
    if variant == "full":
        # The same pipeline as mlxd's `full` variant.
        return {
            "sampler": make_sampler(temp=0.7, top_p=0.9, min_p=0.05, top_k=50),
            "logits_processors": make_logits_processors(repetition_penalty=1.1, repetition_context_size=64),
        }
    raise SystemExit(f"unknown variant {variant!r} (greedy, full)")


def one_run(model, prompt, gen, kwargs):
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    arrivals = []
    for _token, _ in generate_step(prompt, model, max_tokens=gen, **kwargs):
        arrivals.append(time.perf_counter())
    first, end, n = arrivals[0], arrivals[-1], len(arrivals)
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    return {
        "ttft_s": first - start,
        "prefill_tps": len(prompt) / (first - start),
        "decode_tps": (n - 1) / (end - first) if n > 1 else 0.0,
        "step_median_s": gaps[len(gaps) // 2] if gaps else None,
        "peak_bytes": mx.get_peak_memory(),
    }


def main():
    model_dir, plen, gen, repeats, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    variants = (sys.argv[6] if len(sys.argv) > 6 else "greedy").split(",")
    mx.random.seed(1)
    kwargs = {v: variant_kwargs(v) for v in variants}
    model, _tok = load(model_dir)
    vocab = model.args.vocab_size
    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, vocab, size=plen).astype(np.int32))
    runs = {v: [] for v in variants}
    for r in range(repeats + 1):  # the first round warms up and is dropped
        # Each round starts one variant later, as mlxd-bench's do (no variant always first).
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            run = one_run(model, prompt, gen, kwargs[v])
            if r > 0:
                runs[v].append(run)
    print(json.dumps({"engine": "mlx-lm", "mlx": mx.__version__, "variants": {v: {"runs": runs[v]} for v in variants}}))

if __name__ == "__main__":
    main()
