#!/usr/bin/env python3
"""Compare host CPU profiles written by `mlxd-bench engine --profile DIR`, per decode step.

    bench/profile_diff.py DIR/greedy.folded DIR/full.folded [--top 40] [--thread mlxd-bench]

For each file: milliseconds of CPU per decode step, inclusive (the function or anything it
calls was running) and self (the function itself was the leaf), by function name with
template and parameter lists dropped. With two files, the table is sorted by the difference
(second minus first): where the extra host time of the second variant goes.
"""
import argparse
import collections
import sys


def short(name):
    """`ns::f<T>(args) const` -> `ns::f`: drops template and parameter lists."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    s = "".join(out)
    return s.replace("const", "").strip() or name


def load(path, thread):
    incl, self_ = collections.Counter(), collections.Counter()
    steps, hz, total = 1, 997, 0
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                parts = line.split()
                steps, hz = int(parts[2]), int(parts[4])
                continue
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if thread and frames[0] != thread:
                continue
            n = int(count)
            total += n
            names = [short(x) for x in frames[1:]]
            for name in set(names):
                incl[name] += n
            if names:
                self_[names[-1]] += n
    scale = 1000.0 / hz / max(steps, 1)  # samples -> ms per step
    return {k: v * scale for k, v in incl.items()}, {k: v * scale for k, v in self_.items()}, total * scale


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--thread", default="decode", help="thread name to keep ('' for all)")
    ap.add_argument(
        "--cpu-ms",
        help="comma-separated measured CPU ms per step of the thread, one per file (mlxd-bench's "
        "'thread CPU time'): scales each file's samples to it. SIGPROF lands on whichever thread "
        "runs, so sample counts are not comparable across runs; shares within a thread are",
    )
    a = ap.parse_args()
    runs = [load(p, a.thread) for p in a.files]
    if a.cpu_ms:
        targets = [float(x) for x in a.cpu_ms.split(",")]
        scaled = []
        for (incl, self_, total), target in zip(runs, targets):
            f = target / total if total else 0.0
            scaled.append(({k: v * f for k, v in incl.items()}, {k: v * f for k, v in self_.items()}, target))
        runs = scaled
    for p, (_, _, total) in zip(a.files, runs):
        print(f"{p}: {total:.3f} ms of CPU per step on thread {a.thread or 'all'}")
    print("(per-step values are sample shares scaled to --cpu-ms)" if a.cpu_ms else "(per-step values assume every sample landed at --hz; see --cpu-ms)")
    for kind, idx in (("inclusive", 0), ("self", 1)):
        names = set().union(*(r[idx] for r in runs))
        if len(runs) > 1:
            key = lambda n: runs[-1][idx].get(n, 0) - runs[0][idx].get(n, 0)
        else:
            key = lambda n: runs[0][idx].get(n, 0)
        # Frames under which (nearly) every sample sits (main, the decode loop) say nothing.
        names = {n for n in names if idx == 1 or any(r[0].get(n, 0) < 0.95 * r[2] for r in runs)}
        rows = sorted(names, key=key, reverse=True)[: a.top]
        head = " | ".join(f"ms/step {i}" for i in range(len(runs)))
        print(f"\n### {kind}\n| function | {head} |" + (" diff |" if len(runs) > 1 else ""))
        print("| --- |" + " --- |" * (len(runs) + (len(runs) > 1)))
        for n in rows:
            vals = " | ".join(f"{r[idx].get(n, 0):.3f}" for r in runs)
            diff = f" {key(n):+.3f} |" if len(runs) > 1 else ""
            try:
                print(f"| {n[:110]} | {vals} |{diff}")
            except BrokenPipeError:
                return 0


if __name__ == "__main__":
    sys.exit(main())
