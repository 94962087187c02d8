#!/bin/bash
# Session 13, run 7: decode with the spin guard (STREAK 20,000) on and off, alternating
# processes, Qwen3-0.6B 4-bit greedy; idle CPU after each.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r7
mkdir -p $OUT/$R
date -u
for round in 1 2 3 4; do
  for g in 1 0; do
    f=$OUT/$R/engine-q4-guard$g-$round
    MLXD_SPIN_GUARD=$g MLXD_BENCH_IDLE_SECS=2 timeout 100 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 48 --repeats 10 --samplers greedy --no-mlx-lm --cache-prompt 0 --json $f.json > $f.txt 2>&1
    echo "guard=$g round $round rc=$?"; grep -E "^idle|^mlxd greedy:|^\| mlxd greedy" $f.txt | sed 's/thread CPU.*//'
  done
done
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
