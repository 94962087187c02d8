#!/bin/bash
# Session 19, run 2: the report's suite at this session's code on the Qwen3-0.6B shape, 4-bit
# (with the 1-16 client load test against mlx_lm.server) and bf16. Pinned to 8 cores.
source .device/payload/env.sh
R=suite
mkdir -p $OUT/$R
date -u
f=$OUT/$R/suite-qwen3
MLXD_COMMIT=$(head -1 .device/payload/commit.txt) RUST_LOG=warn,mlxd::models=info timeout 560 taskset -c 0-7 mlxd-bench suite --models qwen3-0.6b:q4,qwen3-0.6b:bf16 --serve-model qwen3-0.6b:q4 --repeats 8 --dir /root/models --json $f.json > $f.txt 2>&1
echo "suite rc=$?"; grep -E "done in|rror|panick|^\| [0-9]" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | head -30
date -u
cd $OUT && tar czf r2.tgz $R && rm -rf $R
