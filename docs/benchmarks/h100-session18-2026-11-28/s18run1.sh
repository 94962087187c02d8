#!/bin/bash
# Session 18, run 1: the fused block's kernels let only half the SMs take part (room for a
# second such kernel beside them). At 8 rows its products take 4x their one-row time. Here: the
# kernel's stretches with half and with every SM taking part (MLXD_FUSED_SMS=all), then the
# engine's batches, the daemon and the single stream with every SM. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
for m in half all; do
  f=$OUT/$R/timing-$m
  MLXD_FUSED_SMS=$m MLXD_FUSED_TIMING=1 MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 170 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 64 > $f.txt 2>&1
  echo "timing $m rc=$?"; grep -E "^\| [0-9]|rror|panick|prepared" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400 | head -8
  date -u
done
f=$OUT/$R/batch-all
MLXD_FUSED_SMS=all MLXD_FUSED_BATCH=force RUST_LOG=warn timeout 120 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "^\| [0-9]|rror|panick" $f.txt | cut -c1-400 | head -8
date -u
f=$OUT/$R/serve-all
MLXD_FUSED_SMS=all MLXD_LOG=warn,mlxd::models=info timeout 150 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8,16 --prompt 64 --gen 128 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "^\||rror|panick|fused decode" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -20
date -u
f=$OUT/$R/engine-all
MLXD_FUSED_SMS=all timeout 150 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 5 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
echo "engine rc=$?"; grep -E "^\||bandwidth|ceiling" $f.txt | cut -c1-300 | head -16
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
