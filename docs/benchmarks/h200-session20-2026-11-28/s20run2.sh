#!/bin/bash
# Session 20, run 2: every decoder block of a step in one launch of the fused kernel (grid
# barriers between blocks in place of kernel boundaries; MLXD_FUSED_LAYERS=1 is one launch per
# block, the previous code), with and without weights unpacked through float bits
# (MLXD_FUSED_MAGIC=1). The engine's one row and 8-row batches, the kernel's stretches, then
# the daemon with 1 and 8 clients. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r2
mkdir -p $OUT/$R
date -u
for cfg in "99 0" "1 0" "99 1"; do
  set -- $cfg
  f=$OUT/$R/batch-l$1-m$2
  MLXD_FUSED_LAYERS=$1 MLXD_FUSED_MAGIC=$2 RUST_LOG=warn,mlxd::models=info timeout 150 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
  echo "batch layers=$1 magic=$2 rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|unavailable|again|faster=" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-250 | head -8
  date -u
done
f=$OUT/$R/timing-l99-m0
MLXD_FUSED_TIMING=1 MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 90 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 64 > $f.txt 2>&1
echo "timing rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|unavailable" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -8
date -u
f=$OUT/$R/serve
MLXD_LOG=warn,mlxd::models=info timeout 110 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --prompt 128 --gen 256 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "rror|panick|^\| [0-9]" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -6
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
