"""Paired-round statistics shared by bench/report.py and bench/pool_overheads.py (stdlib only).

Benchmark variants run interleaved in rounds, so each variant's run is set against the greedy
run of its own round: the cost is 1 - variant / greedy, one value per round. The median over
rounds is the overhead; a seeded bootstrap of that median gives its 90% interval.
"""
import random
import statistics
from typing import List, Optional, Tuple


def costs(greedy: List[dict], variant: List[dict], key: str = "decode_tps") -> List[float]:
    """1 - variant / greedy per round (`key` of each run; rounds without a greedy value skipped)."""
    return [1.0 - v[key] / g[key] for g, v in zip(greedy, variant) if g.get(key)]


def interval(values: List[float], draws: int = 2000, minimum: int = 5) -> Optional[Tuple[float, float]]:
    """The 5th and 95th percentiles of the medians of `draws` resamples of `values`, seeded for
    reproducible reports; None for fewer than `minimum` values (or none at all)."""
    if len(values) < max(minimum, 1):
        return None
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[draws // 20], medians[draws - draws // 20 - 1]
