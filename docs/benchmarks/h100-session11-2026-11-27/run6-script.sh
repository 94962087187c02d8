#!/bin/bash
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin 'dry:{"multiplier":0.8}')
mkdir -p $OUT/r6
date -u
$T mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 48 --repeats 40 --samplers greedy,full "${PL[@]}" --no-mlx-lm --cache-prompt 0 --profile $OUT/r6/prof --json $OUT/r6/engine.json > $OUT/r6/engine.txt 2>&1
grep -E "^mlxd|costs|profile of" $OUT/r6/engine.txt
date -u
cd $OUT && tar czf r6.tgz r6 && rm -rf r6
