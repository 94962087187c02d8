#!/bin/bash
# Session 18, run 2 (34b082e): the batched block's rows normed one warp each and its workspace
# rows copied 8 values at a time, every SM taking part for batches. The kernel's stretches, the
# engine's batches, then one row with half and with every SM (MLXD_FUSED_SMS=all), same
# machine. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r2
mkdir -p $OUT/$R
date -u
f=$OUT/$R/timing
MLXD_FUSED_TIMING=1 MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 170 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 2,4,8 --prompt 64 --gen 64 > $f.txt 2>&1
echo "timing rc=$?"; grep -E "^\| [0-9]|rror|panick|prepared|disagree" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | head -8
date -u
f=$OUT/$R/batch
RUST_LOG=warn timeout 120 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "^\| [0-9]|rror|panick" $f.txt | cut -c1-400 | head -8
date -u
for m in half all; do
  f=$OUT/$R/engine-one-row-$m
  MLXD_FUSED_SMS=$m timeout 150 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 5 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
  echo "engine one row $m rc=$?"; grep -E "^\| mlx|bandwidth|ceiling" $f.txt | cut -c1-300 | head -6
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
