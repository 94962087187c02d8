#!/bin/bash
# Session 18, run 3 (the shipped code): one-model processes give the one-row kernel every SM,
# batches take every SM with rows normed a warp each. The daemon with 1-16 clients against
# mlx_lm.server, then the single stream (greedy, full sampling) against mlx-lm. 4-bit
# Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r3
mkdir -p $OUT/$R
date -u
f=$OUT/$R/serve-qwen3-0.6b-q4
MLXD_LOG=warn,mlxd::models=info timeout 330 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8,16 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "fused decode kernel|rror|panick|^\||reach" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -24
date -u
f=$OUT/$R/engine-qwen3-0.6b-q4
timeout 200 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 5 --samplers greedy,full --cache-prompt 0 --json $f.json > $f.txt 2>&1
echo "engine rc=$?"; grep -E "^\||bandwidth|ceiling" $f.txt | cut -c1-300 | head -24
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
