#!/bin/bash
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin passthrough --plugin 'dry:{"multiplier":0.8}')
mkdir -p $OUT/r8
date -u
for m in qwen3-0.6b:q4 qwen3-0.6b:bf16 llama-3.2-1b:bf16 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full "${PL[@]}" --cache-prompt 0 --json $OUT/r8/engine-$s-$d.json > $OUT/r8/engine-$s-$d.txt 2>&1
  grep -E "costs .*run by run" $OUT/r8/engine-$s-$d.txt
  date -u
done
cd $OUT && tar czf r8.tgz r8 && rm -rf r8
