#!/bin/bash
# Session 17, run 5: the shipped defaults (fused block for batches on, the load-time timing
# deciding) with a burst's prompts prefilled together (Engine::start_many): the daemon with
# 1-16 clients against mlx_lm.server, steps and starts logged; the engine's batches with the
# daemon's shapes. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r5
mkdir -p $OUT/$R
date -u
f=$OUT/$R/serve-qwen3-0.6b-q4
MLXD_LOG=warn,mlxd::engine=trace,mlxd::models=info timeout 260 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8,16 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "fused decode kernel (timed|prepared)|rror|panick|^\||reach" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | head -24
grep "^mlxd 8" $f.txt | cut -c1-900
date -u
f=$OUT/$R/batch-qwen3-0.6b-q4
timeout 150 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "^\| [0-9]|rror|panick" $f.txt | cut -c1-600 | head -12
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
