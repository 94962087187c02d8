#!/bin/bash
# Session 14, run 5: this session's sampling kernels (0e06c70: stage 2 on 256 threads, one
# candidate array between the stages): sampler-check against the MLX-op graph, ncu of the two
# kernels, then `mlxd-bench alternate` (greedy, full, pass-through in turns) on four models, two
# processes each.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r5
mkdir -p $OUT/$R
date -u
$T mlxd-bench sampler-check > $OUT/$R/sampler-check.txt 2>&1
echo "sampler-check rc=$?"; grep -E "agree" $OUT/$R/sampler-check.txt | sed 's/.*(cuda), //'
timeout 100 ncu --kernel-name regex:'mlxd' --launch-skip 40 --launch-count 4 --section SpeedOfLight mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers full --gen 30 --repeats 1 > $OUT/$R/ncu.txt 2>&1
echo "ncu rc=$?"; grep -E "^  custom_kernel|Duration" $OUT/$R/ncu.txt | sed 's/(const.*//'
$T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --gen 200 --repeats 6 > $OUT/$R/cost.txt 2>&1
grep -E "^\| (greedy|full)" $OUT/$R/cost.txt
date -u
for round in 1 2; do
  for m in qwen3-0.6b:q4 llama-3.2-1b:bf16 qwen3-0.6b:bf16 llama-3.2-1b:q4; do
    s=${m%:*}; d=${m#*:}
    f=$OUT/$R/alt-$s-$d-$round
    timeout 100 $T mlxd-bench alternate --shape $s --dtype $d --dir /root/models --samplers greedy,full --plugin passthrough --gen 8 --repeats 300 --json $f.json > $f.txt 2>&1
    echo "$m round $round rc=$?"; grep -E "^\| (greedy|full|plugin)" $f.txt
  done
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
