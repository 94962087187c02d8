#!/usr/bin/env python3
"""Pooled per-round overheads of `mlxd-bench engine` / `suite` JSON files.

Each run of a variant is set against the greedy run of its own round (both engines run their
variants interleaved in rounds), the cost is 1 - variant / greedy decode tok/s, and the table
gives, per model and pooled over all files, the median cost with a 90% bootstrap interval.

    python3 bench/pool_overheads.py e-llama.json e-qwen3-q4.json suite.json
"""
import json
import random
import sys


def engine_runs(path):
    """(model label, engine summary) pairs in an engine or suite JSON file."""
    data = json.load(open(path))
    if "variants" in data:
        yield data.get("model", path), data
    for m in data.get("models", []):
        yield f"{m['name']} {m['dtype']}", m["engine"]


def costs(summary, engine, variant):
    greedy = (summary["variants"].get("greedy", {}).get(engine) or {}).get("runs") or []
    runs = (summary["variants"].get(variant, {}).get(engine) or {}).get("runs") or []
    return [100.0 * (1.0 - v["decode_tps"] / g["decode_tps"]) for g, v in zip(greedy, runs)]


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def interval(xs, rng, draws=2000):
    meds = sorted(median([rng.choice(xs) for _ in xs]) for _ in range(draws))
    return meds[int(0.05 * draws)], meds[int(0.95 * draws) - 1]


def main(paths):
    rng = random.Random(1)
    rows, pooled = [], {}
    for path in paths:
        for model, summary in engine_runs(path):
            for variant in summary["variants"]:
                if variant == "greedy":
                    continue
                for engine in ("mlxd", "mlx_lm"):
                    c = costs(summary, engine, variant)
                    if c:
                        rows.append((model, engine, variant, c))
                        pooled.setdefault((engine, variant), []).extend(c)
    print("| model | engine | variant | pairs | cost, median [90% interval] |")
    print("| --- | --- | --- | --- | --- |")
    for model, engine, variant, c in rows:
        lo, hi = interval(c, rng)
        print(f"| {model} | {engine} | {variant} | {len(c)} | {median(c):.1f}% [{lo:.1f}, {hi:.1f}] |")
    for (engine, variant), c in sorted(pooled.items()):
        lo, hi = interval(c, rng)
        print(f"| **all** | {engine} | **{variant}** | {len(c)} | **{median(c):.1f}% [{lo:.1f}, {hi:.1f}]** |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
