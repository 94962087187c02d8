#!/bin/bash
# Session 15, run 1: the fused decode block (one CUDA kernel per decoder block, 4-bit models).
# alternate (greedy fused, full, greedy through MLX's operations in turns) on both 4-bit shapes,
# then the engine with mlx-lm beside, fused (default) and MLXD_FUSED_DECODE=0.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  f=$OUT/$R/alt-$s-$d
  timeout 200 $T mlxd-bench alternate --shape $s --dtype $d --dir /root/models --samplers greedy,full --gen 8 --repeats 150 --json $f.json > $f.txt 2>&1
  echo "$m rc=$?"; grep -E "^fused|^\| (greedy|full)|rror" $f.txt
  date -u
done
for m in qwen3-0.6b:q4 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  for fz in 1 0; do
    f=$OUT/$R/engine-$s-$d-fused$fz
    MLXD_FUSED_DECODE=$fz timeout 120 $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 128 --repeats 6 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
    echo "$m fused=$fz rc=$?"; grep -E "greedy" $f.txt | head -6
  done
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
