#!/bin/bash
# Session 19, run 5: MLX's CUDA-graph cache check. With a cache of 4 graphs (so that the
# 8-miss threshold comes within one short benchmark), the same engine run with the check
# forced on (MLX_ENABLE_CACHE_THRASHING_CHECK=1, MLX's default) and with mlxd's default
# (off unless set). bf16 Qwen3-0.6B shape (MLX's operations: many graph shapes).
source .device/payload/env.sh
R=r5
mkdir -p $OUT/$R
date -u
for check in 1 default; do
  f=$OUT/$R/engine-check-$check
  if [ $check = default ]; then unset MLX_ENABLE_CACHE_THRASHING_CHECK; else export MLX_ENABLE_CACHE_THRASHING_CHECK=$check; fi
  MLX_CUDA_GRAPH_CACHE_SIZE=4 timeout 150 taskset -c 0-7 mlxd-bench engine --shape qwen3-0.6b --dtype bf16 --dir /root/models --prompt 128 --gen 64 --repeats 2 --samplers greedy,full --cache-prompt 500 --no-mlx-lm > $f.txt 2>&1
  echo "check=$check rc=$?"; grep -E "^\| mlxd|thrashing|rror" $f.txt | cut -c1-250 | head -6
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
