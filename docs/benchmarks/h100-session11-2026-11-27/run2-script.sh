#!/bin/bash
# Session 11, run 2 (commit 7e15ad0): the parallel-scan sampling kernels; where DRY's host time goes.
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin passthrough --plugin 'dry:{"multiplier":0.8}')
mkdir -p $OUT/r2
$T mlxd-bench sampler-check > $OUT/r2/sampler-check.txt 2>&1
$T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full "${PL[@]}" --fused-twins --gen 200 --repeats 6 --profile $OUT/r2/prof --json $OUT/r2/cost-qwen.json > $OUT/r2/cost-qwen.txt 2>&1
$T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full "${PL[@]}" --gen 100 --repeats 3 --clients 8 > $OUT/r2/cost-qwen-8rows.txt 2>&1
for m in llama-3.2-1b qwen3-0.6b; do
  $T mlxd-bench engine --shape $m --dtype bf16 --dir /root/models --prompt 128 --gen 48 --repeats 25 --samplers greedy,full "${PL[@]}" --cache-prompt 0 --json $OUT/r2/engine-$m.json > $OUT/r2/engine-$m.txt 2>&1
done
