#!/bin/bash
# Session 14, run 2: paired rounds, greedy vs full, mlx-lm beside, four models (spin guard on; compiled decode pieces off, as committed after this session).
source .device/payload/env.sh
export MLXD_COMPILED_DECODE=0
T="taskset -c 0-7"
R=r2
mkdir -p $OUT/$R
date -u
for m in llama-3.2-1b:bf16 qwen3-0.6b:q4 qwen3-0.6b:bf16 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full --cache-prompt 0 --json $OUT/$R/engine-$s-$d.json > $OUT/$R/engine-$s-$d.txt 2>&1
  echo "$m"; grep -E "costs .*run by run|^mlxd (greedy|full):|greedy: [0-9.]+x" $OUT/$R/engine-$s-$d.txt | sed 's/thread CPU.*//'
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
