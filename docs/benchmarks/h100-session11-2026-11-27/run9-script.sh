#!/bin/bash
# Session 11, run 9: the sampling step compiled (default) against eager (MLXD_SAMPLER_EAGER=1).
source .device/payload/env.sh
T="taskset -c 0-7"
mkdir -p $OUT/r9
date -u
for mode in compiled eager; do
  env=(); [ $mode = eager ] && env=(MLXD_SAMPLER_EAGER=1)
  env "${env[@]}" $T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --gen 200 --repeats 6 > $OUT/r9/cost-$mode.txt 2>&1
  tail -4 $OUT/r9/cost-$mode.txt
done
for m in qwen3-0.6b:q4 llama-3.2-1b:bf16; do
  s=${m%:*}; d=${m#*:}
  for mode in compiled eager; do
    env=(); [ $mode = eager ] && env=(MLXD_SAMPLER_EAGER=1)
    env "${env[@]}" $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full --no-mlx-lm --cache-prompt 0 --json $OUT/r9/engine-$s-$d-$mode.json > $OUT/r9/engine-$s-$d-$mode.txt 2>&1
    echo "$m $mode"; grep -E "costs .*run by run|host build" $OUT/r9/engine-$s-$d-$mode.txt
  done
  date -u
done
cd $OUT && tar czf r9.tgz r9 && rm -rf r9
