#!/bin/bash
# Session 13, run 6: the spin guard for MLX's CUDA worker only. Idle CPU of a process that has
# sampled on the GPU, guard on and off; then paired decode rounds with it on and off.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r6
mkdir -p $OUT/$R
date -u
for g in 1 0 1 0; do
  MLXD_SPIN_GUARD=$g MLXD_BENCH_IDLE_SECS=5 timeout 120 $T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --gen 100 --repeats 3 > $OUT/$R/idle-guard$g-$RANDOM.txt 2>&1
  echo "guard=$g rc=$?"; grep -hE "^idle|^\| (greedy|full)" $(ls -t $OUT/$R/idle-guard$g-*.txt | head -1)
done
date -u
for round in 1 2; do
  for g in 1 0; do
    f=$OUT/$R/engine-q4-guard$g-$round
    MLXD_SPIN_GUARD=$g MLXD_BENCH_IDLE_SECS=3 timeout 150 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 48 --repeats 10 --samplers greedy,full --no-mlx-lm --cache-prompt 0 --json $f.json > $f.txt 2>&1
    echo "engine guard=$g round $round rc=$?"; grep -E "^idle|costs .*run by run|^mlxd (greedy|full):" $f.txt | sed 's/thread CPU.*//'
  done
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
