#!/bin/bash
# Session 20, run 1: 512 threads per block (MLXD_FUSED_THREADS=512: 16 warps on each SM in place
# of 8) and weights unpacked through float bits (MLXD_FUSED_MAGIC=1), against session 19's
# kernels (256 threads, integer conversions). The kernels' stretches for 1, 2, 4 and 8 rows in
# each of the four settings (the one-row kernel counts them now too), then the engine's one row
# and 8-row batches in the old setting and the new. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
for cfg in "256 0" "512 0" "256 1" "512 1"; do
  set -- $cfg
  f=$OUT/$R/timing-t$1-m$2
  MLXD_FUSED_THREADS=$1 MLXD_FUSED_MAGIC=$2 MLXD_FUSED_TIMING=1 MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 100 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 64 > $f.txt 2>&1
  echo "timing threads=$1 magic=$2 rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|unavailable|faster=" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -8
  date -u
done
for cfg in "256 0" "512 1" "512 0"; do
  set -- $cfg
  f=$OUT/$R/batch-t$1-m$2
  MLXD_FUSED_THREADS=$1 MLXD_FUSED_MAGIC=$2 RUST_LOG=warn,mlxd::models=info timeout 80 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
  echo "batch threads=$1 magic=$2 rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|unavailable" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -6
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
