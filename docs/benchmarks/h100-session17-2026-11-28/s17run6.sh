#!/bin/bash
# Session 17, run 6: the shipped defaults (fused block for batches on, following one
# sequence's timing verdict): the daemon with 1-16 clients against mlx_lm.server, 4-bit
# Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r6
mkdir -p $OUT/$R
date -u
f=$OUT/$R/serve-qwen3-0.6b-q4
MLXD_LOG=warn,mlxd::models=info timeout 330 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8,16 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "fused decode kernel|rror|panick|^\||reach" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | head -24
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
