#!/bin/bash
# Session 12, run 1 (commit 84fc441): warp-aggregated histograms + stage-2 key cache + compact
# sources, against the b4c80ad kernels (mlxd-bench-old) in alternating processes; then paired
# engine rounds on the two models where full sampling cost most.
source .device/payload/env.sh
P=.device/payload
chmod +x $P/mlxd-bench-old
T="taskset -c 0-7"
mkdir -p $OUT/r1
date -u
$T mlxd-bench sampler-check > $OUT/r1/sampler-check.txt 2>&1
grep -E "agree" $OUT/r1/sampler-check.txt | sed 's/.*(cuda), //'
for round in 1 2 3; do
  for b in new old; do
    bin=mlxd-bench; [ $b = old ] && bin=$P/mlxd-bench-old
    $T $bin sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --fused-twins --gen 200 --repeats 6 > $OUT/r1/cost-$b-$round.txt 2>&1
    echo "$b $round"; grep -E "^\| (greedy|full)" $OUT/r1/cost-$b-$round.txt
  done
done
$T mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --fused-twins --gen 100 --repeats 3 --clients 8 > $OUT/r1/cost-new-8rows.txt 2>&1
$T $P/mlxd-bench-old sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --fused-twins --gen 100 --repeats 3 --clients 8 > $OUT/r1/cost-old-8rows.txt 2>&1
grep -E "^\| (greedy|full)" $OUT/r1/cost-new-8rows.txt $OUT/r1/cost-old-8rows.txt
date -u
for m in llama-3.2-1b:bf16 qwen3-0.6b:q4; do
  s=${m%:*}; d=${m#*:}
  $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 30 --samplers greedy,full --fused-twins --cache-prompt 0 --json $OUT/r1/engine-$s-$d.json > $OUT/r1/engine-$s-$d.txt 2>&1
  echo "$m"; grep -E "costs .*run by run|^mlxd (greedy|full)" $OUT/r1/engine-$s-$d.txt | sed 's/thread CPU.*//'
  date -u
done
cd $OUT && tar czf r1.tgz r1 && rm -rf r1
