#!/usr/bin/env python3
"""Pooled per-round overheads of `mlxd-bench engine` / `suite` / `alternate` JSON files.

Each run of a variant is set against the greedy run of its own round (both engines run their
variants interleaved in rounds), the cost is 1 - variant / greedy decode tok/s, and the table
gives, per model and pooled over all files, the median cost with a 90% bootstrap interval.
In `alternate` files a round is a block of steps of each variant in one ongoing decode, and
the cost is the variant's mean step time over greedy's in the round, minus 1.

    python3 bench/pool_overheads.py e-llama.json e-qwen3-q4.json suite.json alt-*.json
"""
import json
import statistics
import sys

import paired  # bench/paired.py, beside this script


def engine_runs(path):
    """(model label, engine summary) pairs in an engine or suite JSON file."""
    data = json.load(open(path))
    if "variants" in data:
        yield data.get("model", path), data
    for m in data.get("models", []):
        yield f"{m['name']} {m['dtype']}", m["engine"]


def costs(summary, engine, variant):
    """Percent costs of `variant` against the greedy run of each round."""
    runs = lambda v: (summary["variants"].get(v, {}).get(engine) or {}).get("runs") or []  # noqa: E731
    return [100.0 * c for c in paired.costs(runs("greedy"), runs(variant))]


def row(label, engine, variant, c, bold=False):
    lo, hi = paired.interval(c, minimum=1)
    cost = f"{statistics.median(c):.1f}% [{lo:.1f}, {hi:.1f}]"
    if bold:
        return f"| **{label}** | {engine} | **{variant}** | {len(c)} | **{cost}** |"
    return f"| {label} | {engine} | {variant} | {len(c)} | {cost} |"


def alternate_costs(data):
    """(variant, percent costs by round) of an `mlxd-bench alternate` file."""
    steps = {v["variant"]: v["round_mean_step_us"] for v in data["variants"]}
    greedy = steps.get("greedy", [])
    for variant, times in steps.items():
        if variant != "greedy":
            yield variant, [100.0 * (t / g - 1.0) for g, t in zip(greedy, times)]


def main(paths):
    rows, pooled = [], {}
    for path in paths:
        data = json.load(open(path))
        if "block_steps" in data:
            for variant, c in alternate_costs(data):
                rows.append(row(data.get("model", path), "mlxd", variant, c))
                pooled.setdefault(("mlxd", variant), []).extend(c)
            continue
        for model, summary in engine_runs(path):
            for variant in summary["variants"]:
                if variant == "greedy":
                    continue
                for engine in ("mlxd", "mlx_lm"):
                    c = costs(summary, engine, variant)
                    if c:
                        rows.append(row(model, engine, variant, c))
                        pooled.setdefault((engine, variant), []).extend(c)
    print("| model | engine | variant | pairs | cost, median [90% interval] |")
    print("| --- | --- | --- | --- | --- |")
    for line in rows:
        print(line)
    for (engine, variant), c in sorted(pooled.items()):
        print(row("all", engine, variant, c, bold=True))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
