#!/bin/bash
# Session 14, run 1: one sequence's decode step as compiled pieces (6856ce7) against every node
# built per step (MLXD_COMPILED_DECODE=0), alternating processes, four models, greedy and full;
# the spin guard (count-only rule, d72af50) on throughout, idle CPU after each process.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
for round in 1 2; do
  for m in qwen3-0.6b:q4 llama-3.2-1b:bf16 qwen3-0.6b:bf16 llama-3.2-1b:q4; do
    s=${m%:*}; d=${m#*:}
    for c in 1 0; do
      f=$OUT/$R/engine-$s-$d-c$c-$round
      MLXD_COMPILED_DECODE=$c MLXD_BENCH_IDLE_SECS=1 timeout 120 $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 8 --samplers greedy,full --no-mlx-lm --cache-prompt 0 --json $f.json > $f.txt 2>&1
      echo "$m c=$c round $round rc=$?"; grep -E "^idle|^process CPU|^mlxd (greedy|full):|^\| mlxd \| (greedy|full)" $f.txt | sed 's/thread CPU.*waiting/ wait/'
    done
  done
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
