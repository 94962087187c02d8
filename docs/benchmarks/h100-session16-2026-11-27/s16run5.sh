#!/bin/bash
# Session 16, run 5: the shipped default (fused block for one sequence; batches opt-in) against
# the session-15 binary (8f690ea), single-stream engine with mlx-lm beside, 4-bit Qwen3-0.6B.
source .device/payload/env.sh; chmod +x .device/payload/mlxd-bench-s15
T="taskset -c 0-7"
R=r5
mkdir -p $OUT/$R
date -u
for b in mlxd-bench mlxd-bench-s15; do
  f=$OUT/$R/engine-qwen3-0.6b-q4-$b
  RUST_LOG=mlxd=info timeout 140 $T $b engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 4 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
  echo "$b engine rc=$?"; grep -E "decode steps|greedy|prepared|timed" $f.txt | cut -c1-300 | head -6
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
