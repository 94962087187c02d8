#!/bin/bash
# Session 16, run 1: the fused decode block for batched steps. The engine's batches (1, 2, 4, 8
# rows) with the fused block and without it (mlxd's batched kernels), 4-bit Qwen3-0.6B and
# Llama-3.2-1B, with what loading decided; then the daemon with 1, 2, 4 and 8 WebSocket clients
# against mlx_lm.server.
source .device/payload/env.sh
T="taskset -c 0-7"
R=r1
mkdir -p $OUT/$R
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:q4; do
  s=${m%:*}; d=${m#*:}
  f=$OUT/$R/batch-$s-$d
  RUST_LOG=mlxd=info timeout 220 $T mlxd-bench batch --shape $s --dtype $d --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 128 --gen 64 --repeats 3 --stagger 8 --json $f.json > $f.txt 2>&1
  echo "$m rc=$?"; grep -E "fused|^\| [0-9]|rror|panick|WARN" $f.txt | cut -c1-400 | head -24
  date -u
done
f=$OUT/$R/serve-qwen3-0.6b-q4
timeout 300 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -vE "^\s*$" $f.txt | tail -16
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
