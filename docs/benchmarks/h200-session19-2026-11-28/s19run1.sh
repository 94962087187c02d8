#!/bin/bash
# Session 19, run 1: in a one-model process the batched fused block now takes two blocks on
# every SM (MLXD_FUSED_BATCH_PER_SM=1 keeps one, as before). Same machine: the kernel's
# stretches, the engine's batches, then the daemon with 1-8 clients. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
date -u
for per in 2 1; do
  f=$OUT/$R/timing-per$per
  MLXD_FUSED_BATCH_PER_SM=$per MLXD_FUSED_TIMING=1 MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 170 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 2,4,8 --prompt 64 --gen 64 > $f.txt 2>&1
  echo "timing per=$per rc=$?"; grep -E "^\| [0-9]|rror|panick|prepared|disagree" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | head -8
  date -u
done
for per in 2 1; do
  f=$OUT/$R/batch-per$per
  MLXD_FUSED_BATCH_PER_SM=$per RUST_LOG=warn,mlxd::models=info timeout 100 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
  echo "batch per=$per rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|not used" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -8
  date -u
done
f=$OUT/$R/serve-per2
MLXD_LOG=warn,mlxd::models=info timeout 120 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "fused decode kernel|rror|panick|^\| [0-9]|reach" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -12
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
