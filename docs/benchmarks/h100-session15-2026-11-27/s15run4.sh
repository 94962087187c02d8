#!/bin/bash
# Session 15, run 4: eight rows in flight per warp. alternate and the engine with mlx-lm on
# 4-bit Qwen3-0.6B, fused block as chosen at load.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r4
mkdir -p $OUT/$R
date -u
f=$OUT/$R/alt-qwen3-0.6b-q4
timeout 200 $T mlxd-bench alternate --shape qwen3-0.6b --dtype q4 --dir /root/models --samplers greedy,full --gen 8 --repeats 150 --json $f.json > $f.txt 2>&1
echo "alt rc=$?"; grep -E "^fused|^\| (greedy|full)|rror" $f.txt
f=$OUT/$R/engine-qwen3-0.6b-q4
timeout 150 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 256 --repeats 8 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
echo "engine rc=$?"; grep -E "one-sequence|greedy" $f.txt | head -6
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
