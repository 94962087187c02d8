#!/bin/bash
# Session 16, run 2: batched steps padded to compiled variants (1, 2, 4, 8 rows, all compiled at
# load). Where the fused block's time goes (MLXD_FUSED_TIMING=1, per phase and barrier) at 1, 2,
# 4 and 8 rows on 4-bit Qwen3-0.6B; the engine's batches; the daemon with 1, 2, 4 and 8 clients
# against mlx_lm.server; single-stream engine with mlx-lm beside.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r2
mkdir -p $OUT/$R
date -u
f=$OUT/$R/timing-qwen3-0.6b-q4
MLXD_FUSED_TIMING=1 RUST_LOG=mlxd=info timeout 150 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 128 --gen 64 --stagger 8 --json $f.json > $f.txt 2>&1
echo "timing rc=$?"; grep -E "fused|^\| |rror|panick|WARN" $f.txt | cut -c1-600 | head -24
date -u
f=$OUT/$R/batch-qwen3-0.6b-q4
RUST_LOG=mlxd=info timeout 220 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,3,4,6,8 --model-kernels on --prompt 128 --gen 64 --repeats 3 --stagger 8 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "fused|^\| [0-9]|rror|panick|WARN" $f.txt | cut -c1-600 | head -24
date -u
f=$OUT/$R/serve-qwen3-0.6b-q4
timeout 300 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -vE "^\s*$" $f.txt | grep -v "^mlx_lm.server" | tail -14
date -u
f=$OUT/$R/engine-qwen3-0.6b-q4
timeout 150 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 6 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
echo "engine rc=$?"; grep -E "decode|greedy|bandwidth|ceiling" $f.txt | head -8
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
