#!/bin/bash
# Session 17, run 1: why 8 daemon clients build their steps 2.5x slower than the engine's 8 rows
# (session 16, run 2: 3.55 against 1.40 ms). The daemon at 4 and 8 clients with every step
# logged (rows, build, wait) and a few steps' graphs by kind; the engine's batches with the
# daemon's shapes (prompt 64, no stagger, 128 tokens), logged the same way. 4-bit Qwen3-0.6B,
# fused batches on (MLXD_FUSED_BATCH=1).
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
export MLXD_FUSED_BATCH=1
f=$OUT/$R/serve-qwen3-0.6b-q4
MLXD_STEP_GRAPH=200,330,460 MLXD_LOG=warn,mlxd::engine=trace,mlxd::models=info timeout 330 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 4,8 --prompt 64 --gen 128 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "^mlxd [0-9]|fused decode|rror|panick" $f.txt | cut -c1-900 | head -12
date -u
f=$OUT/$R/batch-qwen3-0.6b-q4
MLXD_STEP_GRAPH=150,400 RUST_LOG=warn,mlxd::engine=trace,mlxd::models=info timeout 200 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 4,8 --model-kernels fused --prompt 64 --gen 128 --repeats 2 --stagger 0 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "^\| [0-9]|rror|panick" $f.txt | cut -c1-600 | head -12
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
