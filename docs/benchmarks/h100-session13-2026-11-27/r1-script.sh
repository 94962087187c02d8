#!/bin/bash
# Session 13, run 1: the packed sampling parameters and the three host-side model cuts (this
# build) against session 12's build (cc9b7b5 = 84fc441 + the spin guard, off here) in
# alternating processes.
source .device/payload/env.sh
P=.device/payload
xz -d -k -f $P/mlxd-bench-s12.xz; chmod +x $P/mlxd-bench-s12
export MLXD_SPIN_GUARD=0
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
which nsys ncu nvcc 2>&1 | head -3; ls /usr/local/cuda*/bin 2>/dev/null | head -5
$T mlxd-bench sampler-check > $OUT/$R/sampler-check.txt 2>&1
grep -E "agree" $OUT/$R/sampler-check.txt | sed 's/.*(cuda), //'
for round in 1 2; do
  for b in new old; do
    bin=mlxd-bench; [ $b = old ] && bin=$P/mlxd-bench-s12
    $T $bin sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --gen 200 --repeats 6 > $OUT/$R/cost-$b-$round.txt 2>&1
    echo "$b $round"; grep -E "^\| (greedy|full)" $OUT/$R/cost-$b-$round.txt
  done
done
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:bf16 qwen3-0.6b:bf16 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  for round in 1 2; do
    for b in new old; do
      bin=mlxd-bench; [ $b = old ] && bin=$P/mlxd-bench-s12
      $T $bin engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 8 --samplers greedy,full --no-mlx-lm --cache-prompt 0 --json $OUT/$R/engine-$s-$d-$b-$round.json > $OUT/$R/engine-$s-$d-$b-$round.txt 2>&1
      echo "$m $b $round"; grep -E "costs .*run by run|^mlxd (greedy|full):" $OUT/$R/engine-$s-$d-$b-$round.txt | sed 's/thread CPU.*//'
    done
  done
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
