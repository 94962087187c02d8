#!/bin/bash
source .device/payload/env.sh
P=.device/payload
T="taskset -c 0-7"
PL=(--plugin-dir $P --plugin passthrough --plugin 'dry:{"multiplier":0.8}')
mkdir -p $OUT/r4
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full "${PL[@]}" --cache-prompt 0 --json $OUT/r4/engine-$s-$d.json > $OUT/r4/engine-$s-$d.txt 2>&1
  grep -E "^mlxd|^mlx-lm|costs" $OUT/r4/engine-$s-$d.txt
  date -u
done
$T mlxd-bench serve --shape qwen3-0.6b --dtype bf16 --dir /root/models --prompt 64 --gen 256 --clients 1,8,16 --json $OUT/r4/serve.json > $OUT/r4/serve.txt 2>&1
tail -25 $OUT/r4/serve.txt
date -u
cd $OUT && tar czf r4.tgz r4 && rm -rf r4
