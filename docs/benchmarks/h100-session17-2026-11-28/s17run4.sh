#!/bin/bash
# Session 17, run 4: run 3's repeated check found the fused kernel answering the same 8-row
# input the same every time, while the reference (MLX's operations with mlxd's batched-decode
# kernels) once differed from its own first answer by 4% of the largest logit. Which part of
# the reference: the same check with mlxd's batched-decode kernels on and off
# (MLXD_MODEL_KERNELS=0: MLX's operations alone). Then the single stream against mlx-lm at
# this commit. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r4
mkdir -p $OUT/$R
date -u
for mk in 1 0; do
  f=$OUT/$R/check-modelkernels$mk
  MLXD_MODEL_KERNELS=$mk MLXD_FUSED_BATCH=force RUST_LOG=warn timeout 120 $T mlxd-bench fused-check --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 4,8 --repeats 60 --json $f.json > $f.txt 2>&1
  echo "check model kernels=$mk rc=$?"; grep -E "^\| [0-9]|rror|panick" $f.txt | cut -c1-300 | head -6
  date -u
done
f=$OUT/$R/engine-qwen3-0.6b-q4
timeout 200 $T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 5 --samplers greedy,full --cache-prompt 0 --json $f.json > $f.txt 2>&1
echo "engine rc=$?"; grep -E "^\||bandwidth|ceiling" $f.txt | cut -c1-300 | head -24
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
