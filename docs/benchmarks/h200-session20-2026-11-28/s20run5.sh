#!/bin/bash
# Session 20, run 5: the committed code (every decoder block of a step in one launch; session
# 20's tries of 512 threads and float-bit unpacking removed). The engine's one row and 8-row
# batches with all blocks in one launch and with one launch per block (MLXD_FUSED_LAYERS=1,
# the previous code), the daemon with 1 and 8 clients, then the single stream against mlx-lm.
# 4-bit Qwen3-0.6B, pinned to 8 cores.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r5
mkdir -p $OUT/$R
date -u
for n in 99 1; do
  f=$OUT/$R/batch-l$n
  MLXD_FUSED_LAYERS=$n RUST_LOG=warn,mlxd::models=info timeout 150 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
  echo "batch layers=$n rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|unavailable|again|faster=" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-250 | head -8
  date -u
done
f=$OUT/$R/serve
MLXD_LOG=warn,mlxd::models=info timeout 100 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --prompt 128 --gen 256 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "rror|panick|^\| [0-9]" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -6
date -u
f=$OUT/$R/engine
RUST_LOG=warn,mlxd::models=info timeout 150 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 256 --repeats 4 --samplers greedy,full --cache-prompt 0 --json $f.json > $f.txt 2>&1
echo "engine rc=$?"; grep -E "rror|panick|^\| |mlx-lm" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -14
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
