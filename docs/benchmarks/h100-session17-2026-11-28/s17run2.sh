#!/bin/bash
# Session 17, run 2: the fused block for batches in the daemon. Run 1's load-time timing turned
# it down (4 rows: 63.5 ms fused against 61.0 ms through MLX's operations, on rows of 1-4
# positions), so batches ran MLX's operations. Here: (a) the daemon with the kernel forced on
# (MLXD_FUSED_BATCH=force: checked, not timed), every step logged; (b) the daemon with
# MLXD_FUSED_BATCH=1, its timing now on rows of ~100 positions, mlx_lm.server beside; (c) the
# engine's batches with the daemon's shapes, fused (forced) and not. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r2
mkdir -p $OUT/$R
date -u
f=$OUT/$R/serve-force-qwen3-0.6b-q4
MLXD_FUSED_BATCH=force MLXD_STEP_GRAPH=700,850,960 MLXD_LOG=warn,mlxd::engine=trace,mlxd::models=info timeout 200 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve force rc=$?"; grep -E "^mlxd [0-9]|fused decode|rror|panick" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-700 | head -12
date -u
f=$OUT/$R/batch-force-qwen3-0.6b-q4
MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 170 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "^\| [0-9]|rror|panick" $f.txt | cut -c1-600 | head -12
date -u
f=$OUT/$R/serve-timed-qwen3-0.6b-q4
MLXD_FUSED_BATCH=1 MLXD_LOG=warn,mlxd::models=info timeout 200 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve timed rc=$?"; grep -E "fused decode|rror|panick|^\|" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-600 | head -20
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
