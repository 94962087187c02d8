#!/bin/bash
# Session 18, run 4: run 3's 8 clients decode at 4.0x one client's rate, but their prompts
# prefill one after another (TTFT 104 ms), so the aggregate is 3.5x. Session 17's shared
# prefill passes (re-applied) measured with and without (MLXD_SHARED_PREFILL=0), same machine,
# every start and decode step logged. 4-bit Qwen3-0.6B.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r4
mkdir -p $OUT/$R
date -u
for sp in 0 1; do
  f=$OUT/$R/serve-shared$sp
  MLXD_SHARED_PREFILL=$sp MLXD_LOG=warn,mlxd::engine=trace,mlxd::models=info timeout 200 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8,16 --prompt 64 --gen 128 --no-mlx-lm --json $f.json > $f.txt 2>&1
  echo "serve shared=$sp rc=$?"; grep -E "^\| [0-9]|rror|panick|reach" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | head -8
  sed 's/\x1b\[[0-9;]*m//g' $f.txt | grep -E "started|decode step" | tail -330 | grep -B3 -A2 "started" | cut -c12-120 | tail -24
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
