#!/bin/bash
# Session 19, run 6: a warp with one row left of a product takes it alone (template NR1)
# instead of computing it beside empty rows: every warp of the output and down projections,
# where a product has no more rows than warps. MLXD_FUSED_NR1=0 is the previous code. The
# kernel's stretches both ways, then one row and the engine's batches, then the daemon with
# 1 and 8 clients, new code. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r6
mkdir -p $OUT/$R
date -u
for nr in 0 1; do
  f=$OUT/$R/timing-nr1-$nr
  MLXD_FUSED_NR1=$nr MLXD_FUSED_TIMING=1 MLXD_FUSED_BATCH=force RUST_LOG=warn,mlxd::models=info timeout 170 $T mlxd-bench fused-timing --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 2,4,8 --prompt 64 --gen 64 > $f.txt 2>&1
  echo "timing nr1=$nr rc=$?"; grep -E "^\| [0-9]|rror|panick|prepared|disagree|unavailable" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | head -6
  date -u
done
for nr in 1 0; do
  f=$OUT/$R/batch-nr1-$nr
  MLXD_FUSED_NR1=$nr RUST_LOG=warn,mlxd::models=info timeout 90 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --model-kernels fused --prompt 64 --gen 128 --repeats 3 --stagger 0 --json $f.json > $f.txt 2>&1
  echo "batch nr1=$nr rc=$?"; grep -E "^\| [0-9]|rror|panick|disagree|unavailable" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -6
  date -u
done
f=$OUT/$R/serve-nr1-1
MLXD_LOG=warn,mlxd::models=info timeout 100 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,8 --prompt 128 --gen 256 --no-mlx-lm --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -E "rror|panick|^\| [0-9]" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -6
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
