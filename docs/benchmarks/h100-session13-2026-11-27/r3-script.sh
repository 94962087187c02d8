#!/bin/bash
# Session 13, run 3: stage 2 over the chunks above the k-th best chunk maximum (this build)
# against run 1-2's build (97ab1fb, mlxd-bench-prev): correctness, kernel times, host costs.
source .device/payload/env.sh
P=.device/payload
xz -d -k -f $P/mlxd-bench-prev.xz; chmod +x $P/mlxd-bench-prev
T="taskset -c 0-7"
R=r3
mkdir -p $OUT/$R
date -u
$T mlxd-bench sampler-check > $OUT/$R/sampler-check.txt 2>&1
grep -E "agree" $OUT/$R/sampler-check.txt | sed 's/.*(cuda), //'
for t in 1024 256; do
  MLXD_SAMPLER_PICK_THREADS=$t timeout 100 ncu --kernel-name regex:'mlxd' --launch-skip 40 --launch-count 4 --section SpeedOfLight --section LaunchStats mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers full --gen 30 --repeats 1 > $OUT/$R/ncu-$t.txt 2>&1
  echo "ncu pick threads $t"; grep -E "^  custom_kernel|Duration" $OUT/$R/ncu-$t.txt | sed 's/(const.*//'
done
timeout 100 ncu --kernel-name regex:'mlxd' --launch-skip 40 --launch-count 4 --section SpeedOfLight $P/mlxd-bench-prev sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers full --gen 30 --repeats 1 > $OUT/$R/ncu-prev.txt 2>&1
echo "ncu prev"; grep -E "^  custom_kernel|Duration" $OUT/$R/ncu-prev.txt | sed 's/(const.*//'
date -u
for round in 1 2; do
  for b in new new256 prev; do
    bin=mlxd-bench; [ $b = prev ] && bin=$P/mlxd-bench-prev
    th=1024; [ $b = new256 ] && th=256
    MLXD_SAMPLER_PICK_THREADS=$th $T $bin sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers greedy,full --gen 200 --repeats 6 > $OUT/$R/cost-$b-$round.txt 2>&1
    echo "$b $round"; grep -E "^\| (greedy|full)" $OUT/$R/cost-$b-$round.txt
  done
done
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
