#!/bin/bash
# Session 11, run 7: batched sampler state kept stacked; paired rounds on four models again.
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin passthrough --plugin 'dry:{"multiplier":0.8}')
mkdir -p $OUT/r7
date -u
$T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full "${PL[@]}" --gen 100 --repeats 3 --clients 8 --json $OUT/r7/cost-qwen-8rows.json > $OUT/r7/cost-qwen-8rows.txt 2>&1
tail -7 $OUT/r7/cost-qwen-8rows.txt
for m in qwen3-0.6b:q4 qwen3-0.6b:bf16 llama-3.2-1b:bf16 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full "${PL[@]}" --cache-prompt 0 --json $OUT/r7/engine-$s-$d.json > $OUT/r7/engine-$s-$d.txt 2>&1
  grep -E "costs .*run by run|mlxd / mlx-lm" $OUT/r7/engine-$s-$d.txt
  date -u
done
cd $OUT && tar czf r7.tgz r7 && rm -rf r7
