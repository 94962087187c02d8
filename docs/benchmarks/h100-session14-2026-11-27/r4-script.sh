#!/bin/bash
# Session 14, run 4: stage 2 of the sampling kernels on 1,024 threads (default) against 256 (and
# 512 on two models), alternating processes, each `mlxd-bench alternate` greedy vs full.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r4
mkdir -p $OUT/$R
date -u
for round in 1 2; do
  for m in qwen3-0.6b:q4 llama-3.2-1b:bf16 qwen3-0.6b:bf16 llama-3.2-1b:q4; do
    s=${m%:*}; d=${m#*:}
    th="1024 256"; [ $round = 1 ] && [ $s = qwen3-0.6b ] && th="1024 256 512"
    for t in $th; do
      f=$OUT/$R/alt-$s-$d-t$t-$round
      MLXD_SAMPLER_PICK_THREADS=$t timeout 60 $T mlxd-bench alternate --shape $s --dtype $d --dir /root/models --samplers greedy,full --gen 8 --repeats 200 --json $f.json > $f.txt 2>&1
      echo "$m threads=$t round $round rc=$?"; grep -E "^\| full" $f.txt
    done
  done
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
