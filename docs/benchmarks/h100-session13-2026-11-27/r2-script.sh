#!/bin/bash
# Session 13, run 2: paired rounds, greedy vs full, mlx-lm beside, four models (packed params + host cuts).
source .device/payload/env.sh
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
ls /opt/nvidia 2>/dev/null; ls /usr/local/cuda/bin | tr '\n' ' '; echo
timeout 150 ncu --kernel-name regex:'mlxd|arg_reduce|ArgReduce|argmax' --launch-skip 40 --launch-count 8 --section SpeedOfLight --section LaunchStats --section Occupancy mlxd-bench sampler-cost --shape qwen3-0.6b --dtype bf16 --samplers full,greedy --gen 40 --repeats 1 > $OUT/$R/ncu.txt 2>&1
grep -E "mlxd_sample|arg|Duration|Registers|Block Size|Grid Size|Achieved Occupancy|Memory Throughput|Compute \(SM\)" $OUT/$R/ncu.txt | head -60
cd $OUT && tar czf $R.tgz $R && rm -rf $R
