#!/bin/bash
# Session 14, run 6: paired rounds with this session's sampling kernels (0e06c70), greedy vs
# full vs the pass-through plugin, mlx-lm beside, four models.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r6
mkdir -p $OUT/$R
date -u
for m in qwen3-0.6b:bf16 qwen3-0.6b:q4 llama-3.2-1b:bf16 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  timeout 150 $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 20 --samplers greedy,full --plugin passthrough --cache-prompt 0 --json $OUT/$R/engine-$s-$d.json > $OUT/$R/engine-$s-$d.txt 2>&1
  echo "$m rc=$?"; grep -E "costs .*run by run|greedy: [0-9.]+x" $OUT/$R/engine-$s-$d.txt
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
