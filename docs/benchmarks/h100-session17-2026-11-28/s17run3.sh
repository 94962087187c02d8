#!/bin/bash
# Session 17, run 3: run 2 found each restack of the daemon's batch costing 54-146 ms on the
# H100 (steps otherwise build in 1.3 ms): now the stack is a fill and one write per row, rows
# that leave are gathered out, and a fresh sequence's fused storage is evaluated in one wait.
# (a) the load-time check repeated 30 times per batch size (is the kernel deterministic?);
# (b) the daemon, fused batches forced, every step logged; (c) the daemon with the load-time
# timing deciding, 1-16 clients, mlx_lm.server beside. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r3
mkdir -p $OUT/$R
date -u
f=$OUT/$R/check-qwen3-0.6b-q4
MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 150 $T mlxd-bench fused-check --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,3,4,8 --repeats 30 --json $f.json > $f.txt 2>&1
echo "check rc=$?"; grep -E "^\||rror|panick" $f.txt | cut -c1-300 | head -12
date -u
f=$OUT/$R/serve-force-qwen3-0.6b-q4
MLXD_FUSED_BATCH=force MLXD_LOG=warn,mlxd::engine=trace,mlxd::models=info timeout 170 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve force rc=$?"; grep -E "^\||rror|panick" $f.txt | cut -c1-400 | head -8
sed 's/\x1b\[[0-9;]*m//g' $f.txt | grep "decode step " | awk '{for(i=1;i<=NF;i++){split($i,a,"="); if(a[1]=="build_us")b=a[2]} if (b>5000) print}' | cut -c1-200 | head -12
date -u
f=$OUT/$R/serve-timed-qwen3-0.6b-q4
MLXD_FUSED_BATCH=1 MLXD_LOG=warn,mlxd::models=info timeout 230 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8,16 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve timed rc=$?"; grep -E "fused decode|rror|panick|^\||reach" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | head -24
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
