#!/bin/bash
# Session 11, run 1 (commit 69b667c + sampler-cost): where the sampler's host time goes.
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin passthrough --plugin 'dry:{"multiplier":0.8}')
for shape in qwen3-0.6b llama-3.2-1b; do
  $T mlxd-bench sampler-cost --shape $shape --dtype bf16 --samplers greedy,full "${PL[@]}" --gen 200 --repeats 6 --json $OUT/cost-$shape.json > $OUT/cost-$shape.txt 2>&1
  MLXD_SAMPLER_KERNEL=0 $T mlxd-bench sampler-cost --shape $shape --dtype bf16 --samplers greedy,full "${PL[@]}" --gen 200 --repeats 3 > $OUT/cost-$shape-graph.txt 2>&1
done
$T mlxd-bench graph --shape llama-3.2-1b --dtype bf16 --dir /root/models --samplers greedy,full "${PL[@]}" > $OUT/graph-llama.txt 2>&1
$T mlxd-bench engine --shape llama-3.2-1b --dtype bf16 --dir /root/models --prompt 128 --gen 48 --repeats 20 --samplers greedy,full "${PL[@]}" --no-mlx-lm --profile $OUT/prof --json $OUT/engine-llama.json > $OUT/engine-llama.txt 2>&1
