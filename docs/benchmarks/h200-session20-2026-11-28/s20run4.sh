#!/bin/bash
# Session 20, run 4: where a decode step's device time goes outside the fused kernel (one launch
# of all 28 blocks now): Nsight Compute's duration of every kernel of the engine's last decode
# steps (clocks and caches left alone), one row and 8 rows, 4-bit Qwen3-0.6B.
source .device/payload/env.sh
R=r4
mkdir -p $OUT/$R
date -u
NCU=/usr/local/cuda/bin/ncu
for rows in 1 8; do
  f=$OUT/$R/ncu-$rows
  RUST_LOG=warn timeout 250 $NCU --metrics gpu__time_duration.sum --clock-control none --cache-control none --csv --print-units base --log-file $f.csv mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients $rows --model-kernels fused --prompt 16 --gen 24 --repeats 1 --stagger 0 > $f.txt 2>&1
  echo "ncu rows=$rows rc=$?"; tail -3 $f.txt | cut -c1-200
  python3 - "$f.csv" <<'PY'
import csv, sys, collections
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = list(csv.DictReader(lines))
k = [(r["ID"], r["Kernel Name"], float(r["Metric Value"])) for r in rows if r.get("Metric Name") == "gpu__time_duration.sum"]
print("kernels profiled", len(k))
fused = [i for i, x in enumerate(k) if "mlxd_fused" in x[1]]
if len(fused) < 6: print("too few fused launches", len(fused)); sys.exit()
# The last 4 steps: from the 5th-last fused launch to the last one.
a, b = fused[-5], fused[-1]
steps = k[a:b]
tot = collections.OrderedDict()
for _, name, ns in steps:
    key = name.split("(")[0][:90]
    n, t = tot.get(key, (0, 0.0)); tot[key] = (n + 1, t + ns)
all_ns = sum(ns for _, _, ns in steps)
print(f"4 steps: {len(steps)} kernels, {all_ns/4e3:.1f} us of kernel time per step")
for key, (n, t) in sorted(tot.items(), key=lambda x: -x[1][1]):
    print(f"  {t/4e3:8.1f} us/step  {n/4:5.1f} per step  {key}")
PY
  xz -f $f.csv
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
