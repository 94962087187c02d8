#!/bin/bash
# Session 18, run 5: full sampling's cost on the Llama-3.2-1B shape (the open point of issue 8),
# `mlxd-bench alternate`: greedy, full sampling and the pass-through plugin taking turns every
# 8 steps of one decode, 300 rounds, bf16 and 4-bit.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r5
mkdir -p $OUT/$R
date -u
for d in q4 bf16; do
  f=$OUT/$R/alternate-llama-3.2-1b-$d
  RUST_LOG=warn,mlxd::models=info timeout 170 $T mlxd-bench alternate --shape llama-3.2-1b --dtype $d --dir /root/models --samplers greedy,full --plugin passthrough --gen 8 --repeats 300 --json $f.json > $f.txt 2>&1
  echo "alternate $d rc=$?"; grep -E "^\||rror|panick|prepared" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-260 | head -14
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
