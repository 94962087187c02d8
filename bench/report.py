#!/usr/bin/env python3
"""Turn `mlxd-bench suite` JSON results into a markdown report and PNG plots.

    python3 bench/report.py --out-md docs/benchmarks/LABEL.md --out-dir docs/benchmarks/LABEL/ \\
        [--title TEXT] RESULT.json [RESULT2.json ...]

Several JSON files from one machine and session are merged: their `models` lists are
concatenated, the first `serve` and the first measured `bandwidth` found are used, and the
report says so when their stamps disagree (on the device above all). The markdown references the plots by a path relative to itself
(`LABEL/concurrency.png`, `LABEL/overhead.png`, `LABEL/decode.png`); a plot whose data is absent
is not written and the report says what was not measured.

Needs matplotlib (`pip install -r bench/requirements-report.txt`); everything else is stdlib.
"""
import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import paired  # bench/paired.py, beside this script

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench/report.py needs matplotlib: pip install -r bench/requirements-report.txt")

MIB = 1024 * 1024
DASH = "–"

# GPU targets, from the project's issues (DRY from the DRY plugin's issue).
TARGET_SPEEDUP = 1.25  # mlxd / mlx-lm greedy decode, single stream
TARGET_FULL_OVERHEAD = 0.02  # full sampling vs greedy, mlxd
TARGET_PASSTHROUGH_OVERHEAD = 0.01  # pass-through plugin vs greedy
TARGET_DRY_OVERHEAD = 0.03  # DRY plugin vs greedy
TARGET_SCALING_CLIENTS = 8
TARGET_SCALING = 4.0  # aggregate at 8 clients / aggregate at 1 client
TARGET_CLIENT_ENGINE = 0.98  # client-observed / engine decode tok/s
TARGET_BANDWIDTH_FRACTION = 0.10  # batch-1 decode / bandwidth-limited ceiling

ENGINES = {"mlxd": "mlxd", "mlx_lm": "mlx-lm"}
# Table order of sampler variants; names not listed here follow, sorted.
VARIANT_ORDER = ["greedy", "full", "temperature", "top-k", "top-p", "min-p", "repetition",
                 "plugin:passthrough", "plugin:dry"]
# Bars of overhead.png: (variant, engine).
OVERHEAD_BARS = [("full", "mlxd"), ("full", "mlx_lm"), ("plugin:passthrough", "mlxd"), ("plugin:dry", "mlxd")]
STAMP_FIELDS = ["device", "driver", "backend", "mlx", "commit"]


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def fmt(value: Optional[float], spec: str = ".1f") -> str:
    """A number with `spec`, or a dash when it was not measured."""
    return DASH if value is None else format(value, spec)


def fmt_pct(fraction: Optional[float]) -> str:
    """A fraction as a percentage with one decimal (signed: a negative overhead is a gain)."""
    return DASH if fraction is None else f"{fraction * 100:.1f}%"


def fmt_x(ratio: Optional[float], digits: int = 2) -> str:
    """A ratio as `1.50x`."""
    return DASH if ratio is None else f"{ratio:.{digits}f}x"


def fmt_ms(ms: Optional[float]) -> str:
    """A duration given in ms: ms with two decimals below one second, else seconds."""
    if ms is None:
        return DASH
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{ms:.2f} ms"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is zero."""
    return None if a is None or not b else a / b


def overhead(base: Optional[float], other: Optional[float]) -> Optional[float]:
    """Cost of `other` relative to `base` in throughput: 1 - other / base."""
    r = ratio(other, base)
    return None if r is None else 1.0 - r


def md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------------------------------
# Loading: merge several suite files into one
# ---------------------------------------------------------------------------------------------


@dataclass
class Suite:
    """The merged results: one stamp (the first file's), notes on anything inconsistent."""

    stamp: dict
    bandwidth: Optional[dict]
    models: List[dict]
    serve: Optional[dict]
    skipped: List[dict]
    notes: List[str]


def load_suite(paths: List[str]) -> Suite:
    """Read and merge suite files: models concatenated, the first serve used, and the first
    measured bandwidth (else the first failed one, for its error)."""
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            docs.append((path, json.load(f)))

    def first_of(key: str, usable: Callable[[dict], bool] = bool) -> Optional[dict]:
        return next((d[key] for _, d in docs if d.get(key) and usable(d[key])), None)

    return Suite(
        stamp=docs[0][1].get("stamp") or {},
        bandwidth=first_of("bandwidth", best_bandwidth_gbs) or first_of("bandwidth"),
        models=[m for _, d in docs for m in d.get("models") or []],
        serve=first_of("serve"),
        skipped=[s for _, d in docs for s in d.get("skipped") or []],
        notes=stamp_disagreements(docs),
    )


def stamp_disagreements(docs: List[Tuple[str, dict]]) -> List[str]:
    """One note per stamp field (device, driver, ...) whose value differs between the files, and
    for models whose engine ran on another device than its file's stamp says."""
    notes = []
    for field in STAMP_FIELDS:
        values = {path: (d.get("stamp") or {}).get(field) for path, d in docs}
        if len(set(values.values())) > 1:
            listed = "; ".join(f"`{os.path.basename(p)}`: {v or 'n/a'}" for p, v in values.items())
            warn = "**The merged files were measured on different devices**" if field == "device" else f"The {field} differs"
            notes.append(f"{warn}: {listed}. Compare across files with care.")
    for path, d in docs:
        stamp_device = (d.get("stamp") or {}).get("device")
        for m in d.get("models") or []:
            engine_device = (m.get("engine") or {}).get("device")
            if engine_device and stamp_device and engine_device != stamp_device:
                notes.append(f"Model {model_label(m)} ran on {engine_device}, its stamp says {stamp_device}.")
    return notes


def model_label(model: dict) -> str:
    """`name dtype` of a suite model entry."""
    return f"{model.get('name', '?')} {model.get('dtype', '')}".strip()


# ---------------------------------------------------------------------------------------------
# Single stream: statistics of each engine x sampler row, and what follows from them
# ---------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    """Summary of one engine x sampler `runs` list: decode tok/s median, min, max and mean, and
    medians of prefill tok/s, TTFT and peak memory; mlxd's per-step host/device split."""

    n: int
    decode_median: float
    decode_min: float
    decode_max: float
    decode_mean: float
    prefill_median: Optional[float]
    ttft_ms_median: Optional[float]
    peak_mib_median: Optional[float]
    host_build_ms: Optional[float]
    device_wait_ms: Optional[float]


def _median(values: List[float], scale: float = 1.0) -> Optional[float]:
    return statistics.median(values) * scale if values else None


def summarize_runs(entry: Optional[dict]) -> Optional[RunStats]:
    """RunStats of one engine's entry of a variant, or None when it has no runs."""
    runs = (entry or {}).get("runs") or []
    column = lambda key: [r[key] for r in runs if r.get(key) is not None]  # noqa: E731
    decode = column("decode_tps")
    if not decode:
        return None
    return RunStats(
        n=len(decode),
        decode_median=statistics.median(decode),
        decode_min=min(decode),
        decode_max=max(decode),
        decode_mean=statistics.fmean(decode),
        prefill_median=_median(column("prefill_tps")),
        ttft_ms_median=_median(column("ttft_s"), 1000.0),
        peak_mib_median=_median(column("peak_bytes"), 1.0 / MIB),
        host_build_ms=entry.get("host_build_ms_per_step"),
        device_wait_ms=entry.get("device_wait_ms_per_step"),
    )


def variant_sort_key(name: str) -> Tuple[int, str]:
    """Variants in VARIANT_ORDER first, then other samplers, then other plugins, each sorted."""
    if name in VARIANT_ORDER:
        return (VARIANT_ORDER.index(name), "")
    return (len(VARIANT_ORDER) + name.startswith("plugin:"), name)


def variant_title(name: str) -> str:
    """`plugin:dry` -> `plugin: dry`."""
    return name.replace("plugin:", "plugin: ")


@dataclass
class ModelResult:
    """One suite model: its RunStats per (variant, engine) and the comparisons derived from them."""

    label: str
    engine: dict
    stats: Dict[Tuple[str, str], RunStats]

    @classmethod
    def from_suite(cls, model: dict) -> "ModelResult":
        engine = model.get("engine") or {}
        stats = {}
        for variant, entries in (engine.get("variants") or {}).items():
            for key in ENGINES:
                s = summarize_runs((entries or {}).get(key))
                if s is not None:
                    stats[(variant, key)] = s
        return cls(label=model_label(model), engine=engine, stats=stats)

    def variants(self) -> List[str]:
        """Variants that have at least one engine row, in table order."""
        return sorted({v for v, _ in self.stats}, key=variant_sort_key)

    def stat(self, variant: str, engine: str, attr: str) -> Optional[float]:
        """One statistic of a row, None when the row is absent."""
        s = self.stats.get((variant, engine))
        return None if s is None else getattr(s, attr)

    def speedup(self, attr: str = "decode_median") -> Optional[float]:
        """mlxd / mlx-lm greedy decode tok/s."""
        return ratio(self.stat("greedy", "mlxd", attr), self.stat("greedy", "mlx_lm", attr))

    def overhead(self, variant: str, engine: str, attr: str = "decode_median") -> Optional[float]:
        """1 - variant / greedy decode tok/s of the same engine (plugins: vs mlxd greedy)."""
        return overhead(self.stat("greedy", engine, attr), self.stat(variant, engine, attr))

    def paired_overhead(self, variant: str, engine: str = "mlxd", key: str = "decode_tps") -> Optional[float]:
        """1 - the median over repeats of variant / greedy of the same repeat (`key`: decode
        tok/s, or `step_median_s`, the median time between tokens, where the ratio is inverted).
        Runs next to each other share the host's state, so this is steadier than a ratio of
        medians where the host's speed drifts between runs. mlxd's variants always run
        interleaved; mlx-lm's only in runs that carry `step_median_s` (older JSON ran them one
        variant after the other, so their runs are not paired)."""
        def runs(v: str) -> List[dict]:
            return (((self.engine.get("variants") or {}).get(v) or {}).get(engine) or {}).get("runs") or []
        base, other = runs("greedy"), runs(variant)
        if not base or len(base) != len(other):
            return None
        if engine != "mlxd" and not all(r.get("step_median_s") for r in base + other):
            return None
        if key == "step_median_s":
            ratios = [b[key] / o[key] for b, o in zip(base, other) if b.get(key) and o.get(key)]
        else:
            ratios = [o[key] / b[key] for b, o in zip(base, other) if b.get(key)]
        return 1.0 - statistics.median(ratios) if ratios else None

    def paired_interval(self, variant: str, engine: str = "mlxd") -> Optional[Tuple[float, float]]:
        """A 90% bootstrap interval for `paired_overhead` (decode tok/s): the 5th and 95th
        percentiles of the medians of 2,000 resamples of the rounds, seeded for reproducible
        reports; None where the runs are not paired or fewer than 5."""
        def runs(v: str) -> List[dict]:
            return (((self.engine.get("variants") or {}).get(v) or {}).get(engine) or {}).get("runs") or []
        if self.paired_overhead(variant, engine) is None:
            return None
        return paired.interval(paired.costs(runs("greedy"), runs(variant)))

    @property
    def weight_bytes(self) -> Optional[int]:
        return self.engine.get("weight_bytes")

    @property
    def prompt_cache(self) -> Optional[dict]:
        return self.engine.get("prompt_cache")


def single_stream_table(m: ModelResult) -> List[str]:
    """The engine x sampler table of one model."""
    rows = []
    for variant in m.variants():
        for key, engine_name in ENGINES.items():
            s = m.stats.get((variant, key))
            if s is None:
                continue
            split = DASH
            if s.host_build_ms is not None and s.device_wait_ms is not None:
                split = f"{s.host_build_ms:.3f} + {s.device_wait_ms:.3f}"
            rows.append([
                engine_name,
                variant_title(variant),
                f"{s.decode_median:.1f} [{s.decode_min:.1f}–{s.decode_max:.1f}]",
                f"{s.decode_mean:.1f}",
                fmt(s.prefill_median, ".0f"),
                fmt(s.ttft_ms_median, ".1f"),
                fmt(s.peak_mib_median, ".0f"),
                split,
            ])
    header = ["engine", "sampler", "decode tok/s median [min–max]", "mean", "prefill tok/s",
              "TTFT ms", "peak MiB", "host build + device wait ms/step"]
    return md_table(header, rows)


def single_stream_lines(m: ModelResult) -> List[str]:
    """Bullets: speedup over mlx-lm, the cost of every non-greedy variant, the prompt cache."""
    lines = [f"- mlxd / mlx-lm greedy decode: **{fmt_x(m.speedup())}** by median, "
             f"{fmt_x(m.speedup('decode_mean'))} by mean."
             if m.speedup() is not None else "- mlxd / mlx-lm greedy decode: not measured (no mlx-lm greedy row)."]
    for variant in m.variants():
        if variant == "greedy":
            continue
        for key, engine_name in ENGINES.items():
            by_median = m.overhead(variant, key)
            if by_median is None:
                continue
            what = "full sampling" if variant == "full" else f"`{variant_title(variant)}`"
            paired = m.paired_overhead(variant, key)
            by_step = m.paired_overhead(variant, key, "step_median_s")
            paired_text = "" if paired is None else f"; run by run against the greedy run beside it, {fmt_pct(paired)}"
            interval = m.paired_interval(variant, key)
            if interval is not None:
                paired_text += f" [90% interval {fmt_pct(interval[0])}, {fmt_pct(interval[1])}]"
            if by_step is not None:
                paired_text += f", by median time between tokens {fmt_pct(by_step)}"
            lines.append(f"- {engine_name}: {what} costs **{fmt_pct(by_median)}** of greedy decode tok/s by "
                         f"median, {fmt_pct(m.overhead(variant, key, 'decode_mean'))} by mean (1 - {variant} / greedy)"
                         f"{paired_text}.")
    lines.append(prompt_cache_line(m.prompt_cache))
    return lines


def prompt_cache_line(pc: Optional[dict]) -> str:
    """Cold TTFT, the same prompt again, and the prompt with one token appended."""
    if not pc or pc.get("cold_ttft_s") is None:
        return "- Prompt cache: not measured."
    ms = lambda key: None if pc.get(key) is None else pc[key] * 1000.0  # noqa: E731
    line = (f"- Prompt cache, {pc.get('prompt_tokens', '?')}-token prompt: cold TTFT {fmt_ms(ms('cold_ttft_s'))}; "
            f"the same prompt again {fmt_ms(ms('warm_ttft_s'))} (**{fmt_x(pc.get('speedup'), 1)}**)")
    if pc.get("extended_ttft_s") is not None:
        line += f"; one token appended {fmt_ms(ms('extended_ttft_s'))} ({fmt_x(pc.get('extended_speedup'), 1)})"
    return line + "."


def model_header(m: ModelResult) -> str:
    """What one model's rows were measured with."""
    e = m.engine
    parts = [f"prompt {e.get('prompt_tokens', '?')} tokens, {e.get('gen_tokens', '?')} generated, "
             f"{e.get('repeats', '?')} runs per row (interleaved)"]
    if m.weight_bytes:
        parts.append(f"weights {m.weight_bytes / MIB:.1f} MiB")
    if e.get("model"):
        parts.append(f"`{e['model']}`")
    if e.get("mlx_lm_blas_preload"):
        parts.append(f"mlx-lm BLAS preload `{e['mlx_lm_blas_preload']}`")
    return "; ".join(parts) + ". Decode tok/s counts tokens after the first; other columns are medians."


# ---------------------------------------------------------------------------------------------
# Batch-1 bandwidth limit: every weight byte read once per generated token
# ---------------------------------------------------------------------------------------------


def best_bandwidth_gbs(bandwidth: Optional[dict]) -> Optional[float]:
    """The measured best device read bandwidth in GB/s (1e9 bytes/s), None if not measured."""
    return (bandwidth or {}).get("best_gbs") or None


@dataclass
class BandwidthLimit:
    """Floor time per token and ceiling tok/s when a token costs reading `weight_bytes`."""

    floor_ms: float
    ceiling_tps: float


def bandwidth_limit(weight_bytes: Optional[int], best_gbs: Optional[float]) -> Optional[BandwidthLimit]:
    """weight_bytes / bandwidth = the floor ms/token of batch-1 decode, and its ceiling tok/s."""
    if not weight_bytes or not best_gbs:
        return None
    seconds = weight_bytes / (best_gbs * 1e9)
    return BandwidthLimit(floor_ms=seconds * 1000.0, ceiling_tps=1.0 / seconds)


def bandwidth_fraction(m: ModelResult, engine: str, best_gbs: Optional[float]) -> Optional[float]:
    """Greedy decode median of `engine` / the bandwidth-limited ceiling."""
    limit = bandwidth_limit(m.weight_bytes, best_gbs)
    return None if limit is None else ratio(m.stat("greedy", engine, "decode_median"), limit.ceiling_tps)


def bandwidth_section(models: List[ModelResult], bandwidth: Optional[dict]) -> List[str]:
    """The measured bandwidth, the approximation, and a per-model floor/ceiling/fraction table."""
    best = best_bandwidth_gbs(bandwidth)
    lines = ["## Batch-1 bandwidth limit", ""]
    if best is None:
        why = f" ({bandwidth['error']})" if (bandwidth or {}).get("error") else ""
        lines.append(f"Device memory bandwidth: not measured{why}, so no floor or ceiling is computed.")
    else:
        runs = bandwidth.get("runs_gbs") or []
        spread = f", runs {min(runs):.1f}–{max(runs):.1f} GB/s" if runs else ""
        size = f", {bandwidth['bytes'] / MIB:.0f} MiB read" if bandwidth.get("bytes") else ""
        lines.append(f"Device memory bandwidth: best **{best:.1f} GB/s**{spread}{size} "
                     f"({bandwidth.get('method', 'method not recorded')}).")
    lines += ["",
              "Approximation: decoding one token at batch 1 reads every weight once, so weight bytes "
              "per token = `weight_bytes` of the checkpoint. The tied embedding table is counted once, "
              "though it is read in full as the LM head and only one row of it is gathered for the "
              "embedding; KV-cache and activation traffic is ignored. Floor = weight bytes / bandwidth; "
              "ceiling = 1 / floor.", ""]
    rows = []
    for m in models:
        limit = bandwidth_limit(m.weight_bytes, best)
        rows.append([
            m.label,
            fmt(m.weight_bytes / MIB if m.weight_bytes else None, ".1f"),
            fmt(limit and limit.floor_ms, ".3f"),
            fmt(limit and limit.ceiling_tps, ".0f"),
        ] + [f"{fmt(m.stat('greedy', key, 'decode_median'))} ({fmt_pct(bandwidth_fraction(m, key, best))})"
             for key in ENGINES])
    header = ["model", "weight MiB / token", "floor ms/token", "ceiling tok/s",
              "mlxd greedy tok/s (of ceiling)", "mlx-lm greedy tok/s (of ceiling)"]
    return lines + md_table(header, rows)


# ---------------------------------------------------------------------------------------------
# Concurrency: N WebSocket clients against mlxd and mlx_lm.server
# ---------------------------------------------------------------------------------------------


def client_levels(side: Optional[dict]) -> Dict[int, dict]:
    """{clients: level} of one server's results (the numeric keys of its object)."""
    return {int(k): v for k, v in (side or {}).items() if str(k).isdigit() and isinstance(v, dict)}


@dataclass
class ServeResult:
    """Per client count: mlxd's and mlx_lm.server's levels."""

    info: dict
    mlxd: Dict[int, dict]
    peer: Dict[int, dict]

    @classmethod
    def from_suite(cls, serve: Optional[dict]) -> Optional["ServeResult"]:
        if not serve or not client_levels(serve.get("mlxd")):
            return None
        return cls(info=serve, mlxd=client_levels(serve["mlxd"]), peer=client_levels(serve.get("mlx_lm_server")))

    def levels(self) -> List[int]:
        return sorted(set(self.mlxd) | set(self.peer))

    @staticmethod
    def value(side: Dict[int, dict], clients: int, key: str) -> Optional[float]:
        return (side.get(clients) or {}).get(key)

    def host_lines(self) -> List[str]:
        """Per level, what the daemon's decode steps cost the host and how many cores the servers'
        processes kept busy (absent from results of before these were recorded)."""
        out = []
        for c in self.levels():
            ours, theirs = self.mlxd.get(c) or {}, self.peer.get(c) or {}
            step = (ours.get("daemon_steps") or {}).get("host_build_ms_per_step")
            cores = (ours.get("cpu") or {}).get("server_cpu_cores")
            peer_cores = (theirs.get("cpu") or {}).get("server_cpu_cores")
            parts = []
            if step is not None:
                parts.append(f"mlxd {step:.2f} ms of host work per step")
            if cores is not None:
                parts.append(f"its process {cores:.2f} cores busy")
            if peer_cores is not None:
                parts.append(f"mlx_lm.server's {peer_cores:.2f}")
            if parts:
                out.append(f"{clients_text(c)}: " + ", ".join(parts))
        return out

    def client_engine(self, clients: int) -> Optional[float]:
        """Decode tok/s a client observed / what mlxd's engine reported for its sequence."""
        return ratio(self.value(self.mlxd, clients, "per_client_tps_mean"),
                     self.value(self.mlxd, clients, "engine_tps_mean"))

    def min_client_engine(self) -> Optional[Tuple[float, int]]:
        """The lowest client/engine ratio over the levels, with its client count."""
        found = [(r, c) for c in sorted(self.mlxd) if (r := self.client_engine(c)) is not None]
        return min(found) if found else None

    def scaling(self, clients: int = TARGET_SCALING_CLIENTS) -> Optional[float]:
        """mlxd aggregate tok/s at `clients` / at one client."""
        return ratio(self.value(self.mlxd, clients, "aggregate_tps"), self.value(self.mlxd, 1, "aggregate_tps"))

    def vs_peer(self, clients: int) -> Optional[float]:
        """mlxd aggregate / mlx_lm.server aggregate at the same client count."""
        return ratio(self.value(self.mlxd, clients, "aggregate_tps"), self.value(self.peer, clients, "aggregate_tps"))


def clients_text(n: int) -> str:
    """`1 client`, `8 clients`."""
    return f"{n} client" + ("" if n == 1 else "s")


def concurrency_section(serve: Optional[ServeResult], plot: Optional[str]) -> List[str]:
    """The client-count table and the scaling / peer ratios."""
    lines = ["## Concurrent clients", ""]
    if serve is None:
        return lines + ["Not measured (no `serve` results)."]
    info = serve.info
    lines += [f"Model {info.get('model', '?')}: each client sends a {info.get('prompt_tokens', '?')}-token prompt "
              f"and reads {info.get('gen_tokens', '?')} tokens over WebSocket; all start together.", ""]
    v = serve.value
    ttft = lambda side, c: f"{fmt(v(side, c, 'ttft_p50_ms'))} / {fmt(v(side, c, 'ttft_p99_ms'))}"  # noqa: E731
    rows = [[str(c), fmt(v(serve.mlxd, c, "aggregate_tps")), fmt(v(serve.mlxd, c, "per_client_tps_mean")),
             ttft(serve.mlxd, c), fmt(serve.client_engine(c), ".3f"),
             fmt(v(serve.peer, c, "aggregate_tps")), fmt(v(serve.peer, c, "per_client_tps_mean")), ttft(serve.peer, c)]
            for c in serve.levels()]
    header = ["clients", "mlxd aggregate tok/s", "per client", "TTFT p50 / p99 ms", "client / engine decode",
              "mlx_lm.server aggregate", "per client", "TTFT p50 / p99 ms"]
    lines += md_table(header, rows) + [""]
    lines.append(f"- mlxd, {TARGET_SCALING_CLIENTS} clients: **{fmt_x(serve.scaling())}** the single-client aggregate.")
    for c in (8, 16):
        lines.append(f"- mlxd / mlx_lm.server aggregate at {c} clients: **{fmt_x(serve.vs_peer(c))}**.")
    low = serve.min_client_engine()
    if low:
        lines.append(f"- Client-observed / engine decode tok/s: lowest {low[0]:.3f} ({clients_text(low[1])}).")
    host = serve.host_lines()
    if host:
        lines.append("- Where the host's time went, per level: " + "; ".join(host) + ".")
    if not serve.peer:
        lines.append("- mlx_lm.server: not measured.")
    return lines + [""] + plot_lines(plot, "Aggregate tok/s and TTFT vs clients")


# ---------------------------------------------------------------------------------------------
# Targets checklist
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One checklist row: what, the threshold, the measured value (None: not measured)."""

    what: str
    threshold: str
    value: Optional[float]
    shown: str
    met: Callable[[float], bool]
    # A 90% interval around `value`, where there is one: the verdict then needs the whole
    # interval on one side of the threshold, since hosts that move runs by 20-30% put a median
    # on either side of it by chance.
    interval: Optional[Tuple[float, float]] = None

    def status(self) -> str:
        if self.value is None:
            return "not measured"
        if self.interval is not None:
            low, high = self.interval
            if self.met(low) and self.met(high):
                return "met"
            if not self.met(low) and not self.met(high):
                return "**not met**"
            return "undecided (the interval spans the threshold)"
        return "met" if self.met(self.value) else "**not met**"


def targets(models: List[ModelResult], serve: Optional[ServeResult], best_gbs: Optional[float]) -> List[Target]:
    """The GPU targets, per model where they are per model."""
    at_most = lambda limit: (lambda x: x <= limit)  # noqa: E731
    at_least = lambda limit: (lambda x: x >= limit)  # noqa: E731
    rows = []
    for m in models:
        rows.append(Target(f"{m.label}: mlxd / mlx-lm greedy decode", f"≥ {TARGET_SPEEDUP:.2f}x",
                           m.speedup(), fmt_x(m.speedup()), at_least(TARGET_SPEEDUP)))
        for variant, limit, what in [("full", TARGET_FULL_OVERHEAD, "full-sampling overhead"),
                                     ("plugin:passthrough", TARGET_PASSTHROUGH_OVERHEAD, "pass-through plugin overhead"),
                                     ("plugin:dry", TARGET_DRY_OVERHEAD, "DRY plugin overhead")]:
            # Run by run (each run against the greedy run of its round) where the runs are
            # paired, with its interval when there are enough rounds; else the ratio of medians.
            paired = m.paired_overhead(variant, "mlxd")
            cost = paired if paired is not None else m.overhead(variant, "mlxd")
            shown = fmt_pct(cost)
            interval = m.paired_interval(variant, "mlxd")
            if interval is not None:
                shown += f" [{fmt_pct(interval[0])}, {fmt_pct(interval[1])}]"
            how = "run by run" if paired is not None else "median"
            rows.append(Target(f"{m.label}: mlxd {what} ({how})", f"≤ {limit * 100:.0f}%",
                               cost, shown, at_most(limit), interval))
        frac = bandwidth_fraction(m, "mlxd", best_gbs)
        rows.append(Target(f"{m.label}: mlxd batch-1 decode / bandwidth ceiling",
                           f"≥ {TARGET_BANDWIDTH_FRACTION * 100:.0f}%", frac, fmt_pct(frac),
                           at_least(TARGET_BANDWIDTH_FRACTION)))
    scaling = serve and serve.scaling()
    rows.append(Target(f"mlxd aggregate, {TARGET_SCALING_CLIENTS} clients / 1 client", f"≥ {TARGET_SCALING:.0f}x",
                       scaling, fmt_x(scaling), at_least(TARGET_SCALING)))
    vs_peer = serve and serve.vs_peer(TARGET_SCALING_CLIENTS)
    rows.append(Target(f"mlxd / mlx_lm.server aggregate, {TARGET_SCALING_CLIENTS} clients", "> 1.00x",
                       vs_peer, fmt_x(vs_peer), lambda x: x > 1.0))
    low = serve and serve.min_client_engine()
    rows.append(Target("client-observed / engine decode tok/s (lowest level)", f"≥ {TARGET_CLIENT_ENGINE * 100:.0f}%",
                       low[0] if low else None, fmt_pct(low[0]) if low else DASH, at_least(TARGET_CLIENT_ENGINE)))
    return rows


def targets_section(rows: List[Target], gpu: bool) -> List[str]:
    """The checklist; on a CPU run only the values, since the targets are GPU targets."""
    lines = ["## Targets", ""]
    if gpu:
        table = [[t.what, t.threshold, t.shown, t.status()] for t in rows]
        note = ["", "An overhead with a 90% interval (paired rounds, at least 5) is met only when the whole",
                "interval is within the threshold, and not met only when it lies wholly outside.", ""]
        return lines + md_table(["target", "threshold", "measured", "status"], table) + note
    lines += ["These are GPU targets and this is a CPU run: values only, no verdict.", ""]
    table = [[t.what, t.threshold, t.shown if t.value is not None else "not measured"] for t in rows]
    return lines + md_table(["target (GPU)", "threshold", "measured"], table)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

FIG_WIDTH_IN = 9.0  # at DPI 100: 900 px wide
DPI = 100
COLORS = {"mlxd": "#1f77b4", "mlx_lm": "#ff7f0e", "ceiling": "#d62728"}


def stamp_text(stamp: dict) -> str:
    """The stamp in one line, for plot footers."""
    return (f"{stamp.get('device', '?')} | driver {stamp.get('driver') or 'n/a'} | {stamp.get('backend', '?')} | "
            f"MLX {stamp.get('mlx', '?')} | commit {stamp.get('commit') or '?'} | {stamp.get('date', '?')} | "
            f"pinned CPUs {stamp.get('pinned_cpus') or 'none'}")


def save_figure(fig, path: str, footer: str) -> str:
    """Add the stamp footer, lay out, write the PNG and close the figure."""
    fig.text(0.01, 0.01, footer, fontsize=7, color="#555555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_concurrency(serve: Optional[ServeResult], path: str, footer: str) -> Optional[str]:
    """Aggregate tok/s vs clients (log2 x) and TTFT p50 (p99 dashed) vs clients, both servers."""
    if serve is None:
        return None
    fig, (agg_ax, ttft_ax) = plt.subplots(1, 2, figsize=(FIG_WIDTH_IN, 4.2))
    for key, side, name in [("mlxd", serve.mlxd, "mlxd"), ("mlx_lm", serve.peer, "mlx_lm.server")]:
        clients = sorted(side)
        if not clients:
            continue
        get = lambda k: [side[c].get(k) for c in clients]  # noqa: E731
        agg_ax.plot(clients, get("aggregate_tps"), "o-", color=COLORS[key], label=name)
        ttft_ax.plot(clients, get("ttft_p50_ms"), "o-", color=COLORS[key], label=f"{name} p50")
        ttft_ax.plot(clients, get("ttft_p99_ms"), "--", color=COLORS[key], alpha=0.5, label=f"{name} p99")
    levels = serve.levels()
    for ax, title, ylabel in [(agg_ax, "Aggregate decode throughput", "tok/s (all clients)"),
                              (ttft_ax, "Time to first token", "TTFT ms")]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, footer)


def plot_overhead(models: List[ModelResult], path: str, footer: str) -> Optional[str]:
    """Grouped bars per model: overhead vs greedy by median (bars) and by mean (diamonds)."""
    bars = [(v, e) for v, e in OVERHEAD_BARS if any(m.overhead(v, e) is not None for m in models)]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(FIG_WIDTH_IN, 4.5))
    width = 0.8 / len(bars)
    colors = plt.get_cmap("tab10").colors
    for i, (variant, engine) in enumerate(bars):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(models))]
        medians = [m.overhead(variant, engine) for m in models]
        means = [m.overhead(variant, engine, "decode_mean") for m in models]
        label = f"{variant_title(variant)} ({ENGINES[engine]})"
        ax.bar([x for x, y in zip(xs, medians) if y is not None], [y * 100 for y in medians if y is not None],
               width, color=colors[i], label=label)
        ax.plot([x for x, y in zip(xs, means) if y is not None], [y * 100 for y in means if y is not None],
                "D", color="black", markersize=4, label="by mean" if i == 0 else None)
        for x, y in zip(xs, medians):
            label_bar(ax, x, None if y is None else y * 100, "{:.1f}%")
    ax.axhline(TARGET_FULL_OVERHEAD * 100, ls="--", color="gray", label=f"target {TARGET_FULL_OVERHEAD * 100:.0f}% (full)")
    ax.axhline(0, color="black", lw=0.8)
    set_model_axis(ax, [m.label for m in models])
    ax.set_ylabel("% of greedy decode tok/s lost")
    ax.set_title("Sampling / plugin overhead vs greedy (bars: median; diamonds: mean)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return save_figure(fig, path, footer)


def plot_decode(models: List[ModelResult], best_gbs: Optional[float], path: str, footer: str) -> Optional[str]:
    """Per model: greedy decode tok/s of mlxd and mlx-lm (median, min–max whiskers) and the
    bandwidth-limited batch-1 ceiling as a red line over the model's bars."""
    shown = [m for m in models if any((("greedy", e) in m.stats) for e in ENGINES)]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(FIG_WIDTH_IN, 4.5))
    width = 0.38
    for i, (key, name) in enumerate(ENGINES.items()):
        for j, m in enumerate(shown):
            s = m.stats.get(("greedy", key))
            x = j + (i - 0.5) * width
            if s is None:
                label_bar(ax, x, None)
                continue
            ax.bar(x, s.decode_median, width, color=COLORS[key], label=name,
                   yerr=[[s.decode_median - s.decode_min], [s.decode_max - s.decode_median]], capsize=3)
            label_bar(ax, x, s.decode_max, "{:.0f}", shown=s.decode_median)
    for j, m in enumerate(shown):
        limit = bandwidth_limit(m.weight_bytes, best_gbs)
        if limit is not None:
            ax.hlines(limit.ceiling_tps, j - 0.45, j + 0.45, colors=COLORS["ceiling"], lw=2.5)
            ax.annotate(f"ceiling {limit.ceiling_tps:.0f}", (j, limit.ceiling_tps), ha="center", va="bottom",
                        fontsize=8, color=COLORS["ceiling"], xytext=(0, 2), textcoords="offset points")
    dedupe_legend(ax, extra=[("bandwidth ceiling (batch 1)", COLORS["ceiling"])] if best_gbs else [])
    set_model_axis(ax, [m.label for m in shown])
    ax.set_ylabel("decode tok/s (median, min–max)")
    title = "Greedy decode, batch 1" + ("" if best_gbs else " (bandwidth not measured: no ceiling)")
    ax.set_title(title)
    ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.08)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, footer)


def label_bar(ax, x: float, y: Optional[float], spec: str = "{}", shown: Optional[float] = None) -> None:
    """Write `shown` (default y) with `spec` just beyond y (above, below if negative); `n/a` at
    zero for a bar that was not measured."""
    text = "n/a" if y is None else spec.format(y if shown is None else shown)
    below = y is not None and y < 0
    ax.annotate(text, (x, y or 0), ha="center", va="top" if below else "bottom", fontsize=7,
                xytext=(0, -2 if below else 2), textcoords="offset points")


def set_model_axis(ax, labels: List[str]) -> None:
    """One tick per model group; at least three group widths wide so one model's bars stay narrow."""
    ax.set_xticks(range(len(labels)), labels, fontsize=9)
    margin = 0.5 + max(0, 3 - len(labels)) / 2
    ax.set_xlim(-margin, len(labels) - 1 + margin)


def dedupe_legend(ax, extra: List[Tuple[str, str]]) -> None:
    """A legend with one entry per label, plus line entries (label, color) for `extra`."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    for label, color in extra:
        unique[label] = Line2D([], [], color=color, lw=2.5)
    ax.legend(unique.values(), unique.keys(), fontsize=8)


def plot_lines(path: Optional[str], alt: str) -> List[str]:
    """A markdown image paragraph for a written plot (the path already relative to the report)."""
    return [] if path is None else [f"![{alt}]({path})", ""]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def stamp_line(stamp: dict) -> str:
    """Device, driver, backend, MLX version, commit, date, pinned CPUs, host."""
    return (f"**{stamp.get('device', 'unknown device')}** · driver {stamp.get('driver') or 'n/a'} · "
            f"backend {stamp.get('backend', '?')} · MLX {stamp.get('mlx', '?')} · commit {stamp.get('commit') or '?'} · "
            f"{stamp.get('date', 'date unknown')} · pinned CPUs {stamp.get('pinned_cpus') or 'not pinned'}"
            + (f" · host: {stamp['host']}" if stamp.get("host") else ""))


def write_report(suite: Suite, out_md: str, out_dir: str, title: Optional[str]) -> List[str]:
    """Write the plots into out_dir and the markdown to out_md; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    models = [ModelResult.from_suite(m) for m in suite.models]
    serve = ServeResult.from_suite(suite.serve)
    best = best_bandwidth_gbs(suite.bandwidth)
    footer = stamp_text(suite.stamp)
    plots = {
        "decode": plot_decode(models, best, os.path.join(out_dir, "decode.png"), footer),
        "overhead": plot_overhead(models, os.path.join(out_dir, "overhead.png"), footer),
        "concurrency": plot_concurrency(serve, os.path.join(out_dir, "concurrency.png"), footer),
    }
    md_dir = os.path.dirname(os.path.abspath(out_md))
    rel = {k: None if p is None else os.path.relpath(os.path.abspath(p), md_dir).replace(os.sep, "/")
           for k, p in plots.items()}

    stamp = suite.stamp
    sections = [
        [f"# {title or 'mlxd benchmark: ' + stamp.get('device', 'unknown device')}", "", stamp_line(stamp)],
        [f"> - {note}" for note in suite.notes],
        targets_section(targets(models, serve, best), gpu=stamp.get("backend") != "cpu"),
        single_stream_section(models, suite.skipped, rel),
        bandwidth_section(models, suite.bandwidth),
        concurrency_section(serve, rel["concurrency"]),
    ]
    text = "\n\n".join("\n".join(section).strip("\n") for section in sections if section)
    with open(out_md, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return [out_md] + [p for p in plots.values() if p]


def single_stream_section(models: List[ModelResult], skipped: List[dict], rel: Dict[str, Optional[str]]) -> List[str]:
    """Per model: the engine x sampler table and its comparisons; skipped models; two plots."""
    lines = ["## Single stream", ""]
    if not models:
        lines.append("No models measured.")
    for m in models:
        lines += [f"### {m.label}", "", model_header(m), ""]
        lines += single_stream_table(m) + [""] + single_stream_lines(m) + [""]
    if rel["decode"] or rel["overhead"]:
        lines += ["### All models", ""]
        lines += plot_lines(rel["decode"], "Greedy decode tok/s, mlxd vs mlx-lm, with the bandwidth ceiling")
        lines += plot_lines(rel["overhead"], "Overhead vs greedy decode")
    if skipped:
        lines += ["### Skipped", ""]
        lines += [f"- {s.get('model', '?')}: {s.get('why', 'no reason recorded')}" for s in skipped]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-md", required=True, help="markdown report to write")
    parser.add_argument("--out-dir", required=True, help="directory for the PNG plots")
    parser.add_argument("--title", help="report title (default: the device)")
    parser.add_argument("results", nargs="+", help="mlxd-bench suite JSON files (merged)")
    args = parser.parse_args(argv)
    for path in write_report(load_suite(args.results), args.out_md, args.out_dir, args.title):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
