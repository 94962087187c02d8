#!/bin/bash
# Session 11, run 3: DRY's kernel defined once per request (was: every step); paired rounds.
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin passthrough --plugin 'dry:{"multiplier":0.8}')
mkdir -p $OUT/r3
date -u
$T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full "${PL[@]}" --gen 200 --repeats 6 --profile $OUT/r3/prof --json $OUT/r3/cost-qwen.json > $OUT/r3/cost-qwen.txt 2>&1
tail -7 $OUT/r3/cost-qwen.txt
for m in llama-3.2-1b:bf16 qwen3-0.6b:bf16; do
  s=${m%:*}; d=${m#*:}
  $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full "${PL[@]}" --cache-prompt 0 --json $OUT/r3/engine-$s-$d.json > $OUT/r3/engine-$s-$d.txt 2>&1
  grep -E "^mlxd|^mlx-lm|costs" $OUT/r3/engine-$s-$d.txt
  date -u
done
cd $OUT && tar czf r3.tgz r3 && rm -rf r3
