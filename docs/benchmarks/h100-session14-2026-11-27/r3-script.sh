#!/bin/bash
# Session 14, run 3: `mlxd-bench alternate` (greedy, full, pass-through plugin in turns, blocks of
# 8 steps, 300 rounds) on four models; then, on two of them, what the full pipeline's extra host
# time follows: stage 2 on 256 threads (its device time), the fused kernel (one node fewer),
# and the MLX-op graph instead of the kernels (many more nodes).
source .device/payload/env.sh
T="taskset -c 0-7"
R=r3
mkdir -p $OUT/$R
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:bf16 qwen3-0.6b:bf16 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  f=$OUT/$R/alt-$s-$d
  timeout 150 $T mlxd-bench alternate --shape $s --dtype $d --dir /root/models --samplers greedy,full --plugin passthrough --gen 8 --repeats 300 --json $f.json > $f.txt 2>&1
  echo "$m rc=$?"; grep -E "^\| (greedy|full|plugin)" $f.txt
done
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:bf16; do
  s=${m%:*}; d=${m#*:}
  for v in pick256:MLXD_SAMPLER_PICK_THREADS=256 fused:MLXD_SAMPLER_FUSED=1 graph:MLXD_SAMPLER_KERNEL=0; do
    name=${v%%:*}; envset=${v#*:}
    f=$OUT/$R/alt-$s-$d-$name
    env $envset timeout 100 $T mlxd-bench alternate --shape $s --dtype $d --dir /root/models --samplers greedy,full --gen 8 --repeats 200 --json $f.json > $f.txt 2>&1
    echo "$m $name rc=$?"; grep -E "^\| (greedy|full)" $f.txt
  done
done
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
