"""Tests of bench/report.py on synthetic suite JSON, run as a subprocess like a user would.

    REPORT_PYTHON=/path/to/venv/bin/python python3 bench/test_report.py

REPORT_PYTHON is the interpreter that runs the report (it needs matplotlib); it defaults to the
one running the tests.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

REPORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.py")
PYTHON = os.environ.get("REPORT_PYTHON", sys.executable)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

GPU_STAMP = {"date": "2026-11-26T09:10:00Z", "commit": "abc1234", "device": "NVIDIA H100 80GB HBM3",
             "driver": "580.159.04", "backend": "cuda", "mlx": "0.32.2", "pinned_cpus": "0-3", "host": "16 cores"}


def runs(*decode_tps):
    """Run objects with the given decode tok/s (other fields fixed)."""
    return [{"ttft_s": 0.01, "prefill_tps": 12800.0, "decode_tps": d, "peak_bytes": 1024 * 1024 * 1024}
            for d in decode_tps]


def mlxd(*decode_tps):
    return {"runs": runs(*decode_tps), "host_build_ms_per_step": 2.5, "device_wait_ms_per_step": 0.36}


def engine(variants, weight_bytes, prompt_cache=None):
    return {"model": "/models/x", "weight_bytes": weight_bytes, "prompt_tokens": 128, "gen_tokens": 256,
            "repeats": 3, "device": "NVIDIA H100 80GB HBM3", "backend": "cuda", "mlx": "0.32.2",
            "variants": variants, "prompt_cache": prompt_cache}


def level(aggregate, per_client, engine_tps):
    return {"aggregate_tps": aggregate, "engine_tps_mean": engine_tps, "per_client_tps_mean": per_client,
            "ttft_p50_ms": 10.0, "ttft_p99_ms": 12.0, "wall_s": 1.0}


def gpu_suite():
    """Two models and a serve run with known ratios:

    tiny bf16: mlxd greedy 300 vs mlx-lm 200 (1.50x); full: mlxd median 297 (1.0%), mean 292.33
      (2.6%), mlx-lm 180 (10.0%); passthrough 298.5 (0.5%); DRY 285 (5.0%: not met);
      1e9 weight bytes at 1000 GB/s: floor 1 ms, ceiling 1000 tok/s, mlxd 30%.
    other q4: mlxd greedy only (no mlx_lm key, no plugins), 2e9 bytes: ceiling 500, 60 -> 12.0%.
    serve: 8 clients 350 / 1 client 100 = 3.50x (not met); vs mlx_lm.server 350/300 = 1.17x;
      16 clients 600/400 = 1.50x; client/engine lowest 95/100 = 95.0% at 8 clients (not met).
    """
    tiny = engine({
        "greedy": {"mlxd": mlxd(290.0, 300.0, 310.0), "mlx_lm": {"runs": runs(190.0, 200.0, 210.0)}},
        "full": {"mlxd": mlxd(280.0, 297.0, 300.0), "mlx_lm": {"runs": runs(170.0, 180.0, 190.0)}},
        "plugin:passthrough": {"mlxd": mlxd(298.5, 298.5, 298.5), "mlx_lm": None},
        "plugin:dry": {"mlxd": mlxd(285.0, 285.0, 285.0), "mlx_lm": None},
    }, 1_000_000_000, {"prompt_tokens": 2000, "cold_ttft_s": 0.02, "warm_ttft_s": 0.0001, "speedup": 200.0,
                       "extended_ttft_s": 0.002, "extended_speedup": 10.0})
    other = engine({"greedy": {"mlxd": mlxd(50.0, 60.0, 70.0)}}, 2_000_000_000)
    serve = {"model": "tiny bf16", "gen_tokens": 256, "prompt_tokens": 128,
             "mlxd": {"1": level(100.0, 100.0, 100.0), "2": level(180.0, 90.0, 90.0),
                      "8": level(350.0, 95.0, 100.0), "16": level(600.0, 40.0, 40.0)},
             "mlx_lm_server": {"1": level(90.0, 90.0, 0.0), "8": level(300.0, 40.0, 0.0),
                               "16": level(400.0, 25.0, 0.0)}}
    return {"stamp": GPU_STAMP,
            "bandwidth": {"bytes": 1 << 30, "runs_gbs": [990.0, 1000.0], "best_gbs": 1000.0, "method": "sum"},
            "models": [{"name": "tiny", "dtype": "bf16", "engine": tiny},
                       {"name": "other", "dtype": "q4", "engine": other}],
            "serve": serve}


def cpu_suite():
    """A CPU run: no bandwidth (an error), no serve, no mlx-lm, no plugins, no prompt cache."""
    cpu_engine = engine({"greedy": {"mlxd": mlxd(20.0, 21.0, 22.0), "mlx_lm": None},
                         "full": {"mlxd": mlxd(19.0, 20.0, 21.0)}}, 500_000_000)
    stamp = dict(GPU_STAMP, device="AMD EPYC", driver=None, backend="cpu", pinned_cpus=None)
    return {"stamp": stamp, "bandwidth": {"error": "no device timer"},
            "models": [{"name": "smollm2", "dtype": "f32", "engine": dict(cpu_engine, device="AMD EPYC")}],
            "serve": None, "skipped": [{"model": "llama-3.2-1b:q4", "why": "out of memory"}]}


def table_row(md, first_cell):
    """Cells of the markdown table row whose first cell is `first_cell`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{md}")


class ReportTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def report(self, *suites, title=None):
        """Write the suites as JSON files, run report.py on them, return the markdown."""
        paths = []
        for i, suite in enumerate(suites):
            paths.append(os.path.join(self.tmp, f"result{i}.json"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                json.dump(suite, f)
        self.out_md = os.path.join(self.tmp, "docs", "run.md")
        self.out_dir = os.path.join(self.tmp, "docs", "run")
        cmd = [PYTHON, REPORT, "--out-md", self.out_md, "--out-dir", self.out_dir] + (["--title", title] if title else [])
        done = subprocess.run(cmd + paths, capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(self.out_md, encoding="utf-8") as f:
            return f.read()

    def assert_png(self, name):
        with open(os.path.join(self.out_dir, name), "rb") as f:
            self.assertEqual(f.read(8), PNG_SIGNATURE, name)

    def test_interleaved_mlx_lm_runs_are_paired_and_steps_compared(self):
        suite = gpu_suite()
        variants = suite["models"][0]["engine"]["variants"]
        # Runs that carry the median time between tokens: mlx-lm's were interleaved too.
        for variant, steps in [("greedy", (0.0050, 0.0050, 0.0050)), ("full", (0.0050, 0.0055, 0.0060))]:
            for side in ("mlxd", "mlx_lm"):
                for run, step in zip(variants[variant][side]["runs"], steps):
                    run["step_median_s"] = step
        md = self.report(suite)
        # mlx-lm run by run: 170/190, 180/200, 190/210 -> median 0.9 -> 10.0%; steps 5/5, 5/5.5,
        # 5/6 -> median 0.9091 -> 9.1%.
        self.assertIn("mlx-lm: full sampling costs **10.0%** of greedy decode tok/s by median, 10.0% by mean "
                      "(1 - full / greedy); run by run against the greedy run beside it, 10.0%, "
                      "by median time between tokens 9.1%.", md)
        self.assertIn("run by run against the greedy run beside it, 3.2%, by median time between tokens 9.1%.", md)

    def test_enough_rounds_get_an_interval(self):
        suite = gpu_suite()
        variants = suite["models"][0]["engine"]["variants"]
        # Six rounds, full 2% slower than greedy in every one: the interval is that 2% too.
        variants["greedy"]["mlxd"] = mlxd(100.0, 300.0, 200.0, 250.0, 150.0, 120.0)
        variants["full"]["mlxd"] = mlxd(98.0, 294.0, 196.0, 245.0, 147.0, 117.6)
        md = self.report(suite)
        self.assertIn("run by run against the greedy run beside it, 2.0% [90% interval 2.0%, 2.0%]", md)

    def test_gpu_ratios_and_lines(self):
        md = self.report(gpu_suite(), title="Synthetic H100")
        self.assertTrue(md.startswith("# Synthetic H100\n"))
        for part in ["NVIDIA H100 80GB HBM3", "driver 580.159.04", "backend cuda", "MLX 0.32.2", "commit abc1234",
                     "2026-11-26T09:10:00Z", "pinned CPUs 0-3"]:
            self.assertIn(part, md.split("\n")[2])
        self.assertIn("mlxd / mlx-lm greedy decode: **1.50x** by median, 1.50x by mean", md)
        self.assertIn("mlxd: full sampling costs **1.0%** of greedy decode tok/s by median, 2.6% by mean", md)
        # Run by run: 280/290, 297/300, 300/310 -> median 0.9677 -> 3.2%; mlx-lm runs are not paired.
        self.assertIn("(1 - full / greedy); run by run against the greedy run beside it, 3.2%.", md)
        self.assertIn("mlx-lm: full sampling costs **10.0%** of greedy decode tok/s by median, 10.0% by mean "
                      "(1 - full / greedy).", md)
        self.assertIn("mlx-lm: full sampling costs **10.0%** of greedy decode tok/s by median, 10.0% by mean", md)
        self.assertIn("mlxd: `plugin: passthrough` costs **0.5%**", md)
        self.assertIn("mlxd: `plugin: dry` costs **5.0%**", md)
        self.assertIn("cold TTFT 20.00 ms; the same prompt again 0.10 ms (**200.0x**); "
                      "one token appended 2.00 ms (10.0x)", md)
        self.assertIn("mlxd / mlx-lm greedy decode: not measured (no mlx-lm greedy row)", md)
        self.assertIn("- Prompt cache: not measured.", md)
        # engine x sampler table: decode median [min-max], mean, host + device split.
        self.assertEqual(table_row(md, "mlxd")[:4], ["mlxd", "greedy", "300.0 [290.0–310.0]", "300.0"])
        self.assertIn("| mlx-lm | full | 180.0 [170.0–190.0] | 180.0 | 12800 | 10.0 | 1024 | – |", md)
        self.assertIn("| mlxd | plugin: dry | 285.0 [285.0–285.0] | 285.0 | 12800 | 10.0 | 1024 | 2.500 + 0.360 |", md)

    def test_gpu_bandwidth_and_concurrency(self):
        md = self.report(gpu_suite())
        self.assertIn("best **1000.0 GB/s**", md)
        self.assertEqual(table_row(md, "tiny bf16")[1:], ["953.7", "1.000", "1000", "300.0 (30.0%)", "200.0 (20.0%)"])
        self.assertEqual(table_row(md, "other q4")[1:], ["1907.3", "2.000", "500", "60.0 (12.0%)", "– (–)"])
        self.assertEqual(table_row(md, "8"), ["8", "350.0", "95.0", "10.0 / 12.0", "0.950", "300.0", "40.0",
                                              "10.0 / 12.0"])
        self.assertEqual(table_row(md, "2")[5:], ["–", "–", "– / –"])
        self.assertIn("mlxd, 8 clients: **3.50x** the single-client aggregate", md)
        self.assertIn("mlxd / mlx_lm.server aggregate at 8 clients: **1.17x**", md)
        self.assertIn("mlxd / mlx_lm.server aggregate at 16 clients: **1.50x**", md)
        self.assertIn("lowest 0.950 (8 clients)", md)

    def test_gpu_targets(self):
        md = self.report(gpu_suite())
        expect = {
            "tiny bf16: mlxd / mlx-lm greedy decode": ("1.50x", "met"),
            # Paired runs: run by run (280/290, 297/300, 300/310 -> 3.2%), not the 1.0% of medians.
            "tiny bf16: mlxd full-sampling overhead (run by run)": ("3.2%", "**not met**"),
            "tiny bf16: mlxd pass-through plugin overhead (run by run)": ("0.5%", "met"),
            "tiny bf16: mlxd DRY plugin overhead (run by run)": ("5.0%", "**not met**"),
            "tiny bf16: mlxd batch-1 decode / bandwidth ceiling": ("30.0%", "met"),
            "other q4: mlxd / mlx-lm greedy decode": ("–", "not measured"),
            "other q4: mlxd full-sampling overhead (median)": ("–", "not measured"),
            "other q4: mlxd DRY plugin overhead (median)": ("–", "not measured"),
            "other q4: mlxd batch-1 decode / bandwidth ceiling": ("12.0%", "met"),
            "mlxd aggregate, 8 clients / 1 client": ("3.50x", "**not met**"),
            "mlxd / mlx_lm.server aggregate, 8 clients": ("1.17x", "met"),
            "client-observed / engine decode tok/s (lowest level)": ("95.0%", "**not met**"),
        }
        for what, (value, status) in expect.items():
            self.assertEqual(table_row(md, what)[2:], [value, status], what)

    def test_host_time_per_level_when_recorded(self):
        self.assertNotIn("Where the host's time went", self.report(gpu_suite()))
        suite = gpu_suite()
        suite["serve"]["mlxd"]["8"].update({"daemon_steps": {"host_build_ms_per_step": 8.6}, "cpu": {"server_cpu_cores": 2.5}})
        suite["serve"]["mlx_lm_server"]["8"]["cpu"] = {"server_cpu_cores": 1.25}
        md = self.report(suite)
        self.assertIn("- Where the host's time went, per level: 8 clients: mlxd 8.60 ms of host work per step, "
                      "its process 2.50 cores busy, mlx_lm.server's 1.25.", md)

    def test_overhead_verdict_needs_the_whole_interval(self):
        # Seven paired rounds against a steady greedy of 100 tok/s: costs in percent.
        def model(name, full, dry, passthrough):
            variants = {"greedy": {"mlxd": mlxd(*[100.0] * 7)}}
            for variant, costs in [("full", full), ("plugin:dry", dry), ("plugin:passthrough", passthrough)]:
                variants[variant] = {"mlxd": mlxd(*[100.0 - c for c in costs])}
            return {"name": name, "dtype": "bf16", "engine": engine(variants, 1_000_000_000)}

        suite = gpu_suite()
        suite["models"] = [model("a", full=[0.5, 1.0, 1.5, 1.0, 0.8, 1.2, 1.1],  # wholly under 2%
                                 dry=[4.0, 5.0, 6.0, 5.5, 4.5, 5.0, 4.8],  # wholly over 3%
                                 passthrough=[-3.0, 4.0, 0.0, 2.0, -2.0, 3.0, 0.5])]  # spans 1%
        md = self.report(suite)
        self.assertEqual(table_row(md, "a bf16: mlxd full-sampling overhead (run by run)")[3], "met")
        self.assertEqual(table_row(md, "a bf16: mlxd DRY plugin overhead (run by run)")[3], "**not met**")
        # Its median, 0.5%, is under the 1% threshold, but the interval reaches past it.
        row = table_row(md, "a bf16: mlxd pass-through plugin overhead (run by run)")
        self.assertTrue(row[2].startswith("0.5% ["), row)
        self.assertEqual(row[3], "undecided (the interval spans the threshold)")

    def test_plots_written_and_referenced(self):
        md = self.report(gpu_suite())
        for name in ["concurrency.png", "overhead.png", "decode.png"]:
            self.assert_png(name)
            self.assertIn(f"](run/{name})", md)

    def test_cpu_run_lists_values_only(self):
        md = self.report(cpu_suite())
        self.assertIn("These are GPU targets and this is a CPU run: values only, no verdict.", md)
        self.assertNotIn("| met |", md)
        self.assertNotIn("not met", md)
        self.assertEqual(table_row(md, "smollm2 f32: mlxd full-sampling overhead (run by run)")[2:], ["4.8%"])
        self.assertEqual(table_row(md, "smollm2 f32: mlxd / mlx-lm greedy decode")[2:], ["not measured"])
        self.assertIn("driver n/a", md)
        self.assertIn("pinned CPUs not pinned", md)
        self.assertIn("Device memory bandwidth: not measured (no device timer)", md)
        self.assertEqual(table_row(md, "smollm2 f32")[1:], ["476.8", "–", "–", "21.0 (–)", "– (–)"])
        self.assertIn("## Concurrent clients\n\nNot measured (no `serve` results).", md)
        self.assertIn("### Skipped\n\n- llama-3.2-1b:q4: out of memory", md)
        self.assert_png("decode.png")
        self.assert_png("overhead.png")
        self.assertFalse(os.path.exists(os.path.join(self.out_dir, "concurrency.png")))
        self.assertNotIn("concurrency.png", md)

    def test_merge_concatenates_and_flags_other_device(self):
        first = dict(gpu_suite(), serve=None)
        second = cpu_suite()
        second["serve"] = gpu_suite()["serve"]
        md = self.report(first, second)
        self.assertIn("**The merged files were measured on different devices**: `result0.json`: "
                      "NVIDIA H100 80GB HBM3; `result1.json`: AMD EPYC.", md)
        for label in ["### tiny bf16", "### other q4", "### smollm2 f32"]:
            self.assertIn(label, md)
        self.assertIn("mlxd, 8 clients: **3.50x**", md)  # the first serve found (second file)
        self.assertIn("best **1000.0 GB/s**", md)  # the first bandwidth found (first file)
        self.assert_png("concurrency.png")


class PoolOverheadsTest(unittest.TestCase):
    """bench/pool_overheads.py: each run against the greedy run of its round, pooled over files."""

    POOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pool_overheads.py")

    def pool(self, *summaries):
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, summary in enumerate(summaries):
                paths.append(os.path.join(tmp, f"{i}.json"))
                with open(paths[-1], "w") as f:
                    json.dump(summary, f)
            out = subprocess.run([sys.executable, self.POOL, *paths], capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stderr)
            return out.stdout.splitlines()

    def test_costs_are_paired_by_round_and_pooled(self):
        # Greedy drifts from round to round; the variant is 1%, 5%, 4% below the greedy run of
        # its own round: paired by round the median is 4.0% (medians of each side: 1.0%).
        engine = {"model": "m1", "variants": {
            "greedy": {"mlxd": {"runs": runs(100, 200, 50)}, "mlx_lm": {"runs": runs(80, 80, 80)}},
            "full": {"mlxd": {"runs": runs(99, 190, 48)}, "mlx_lm": {"runs": runs(72, 72, 72)}},
        }}
        suite = {"models": [{"name": "m2", "dtype": "q4", "engine": {"variants": {
            "greedy": {"mlxd": {"runs": runs(100, 100)}},
            "full": {"mlxd": {"runs": runs(90, 90)}},
        }}}]}
        lines = self.pool(engine, suite)
        self.assertIn("| m1 | mlxd | full | 3 | 4.0% [", "\n".join(lines))
        self.assertIn("| m1 | mlx_lm | full | 3 | 10.0% [10.0, 10.0] |", lines)
        self.assertIn("| m2 q4 | mlxd | full | 2 | 10.0% [10.0, 10.0] |", lines)
        pooled = [line for line in lines if line.startswith("| **all** | mlxd | **full** |")]
        self.assertEqual(len(pooled), 1)
        # Five pairs: 1, 4, 5, 10, 10 -> median 5.0.
        self.assertIn("| 5 | **5.0% [", pooled[0])

    def test_no_files_is_a_usage_error(self):
        out = subprocess.run([sys.executable, self.POOL], capture_output=True, text=True)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("pool_overheads.py", out.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
