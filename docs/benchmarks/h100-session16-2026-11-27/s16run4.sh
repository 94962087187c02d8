#!/bin/bash
# Session 16, run 4: one row through the session-15 products again (floats in shared memory),
# batches through the batched products. Single-stream engine against the session-15 binary
# (8f690ea) with mlx-lm beside; the engine's batches with the fused block and without it; the
# daemon with 1, 2, 4 and 8 clients, fused batches on and off (MLXD_FUSED_BATCH=0).
source .device/payload/env.sh; chmod +x .device/payload/mlxd-bench-s15 .device/payload/mlxd-engine
T="taskset -c 0-7"
R=r4
mkdir -p $OUT/$R
date -u
for b in mlxd-bench mlxd-bench-s15; do
  f=$OUT/$R/engine-qwen3-0.6b-q4-$b
  RUST_LOG=mlxd=info timeout 150 $T $b engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 128 --repeats 6 --samplers greedy --cache-prompt 0 --json $f.json > $f.txt 2>&1
  echo "$b engine rc=$?"; grep -E "decode steps|greedy|bandwidth|ceiling|fused_ms" $f.txt | cut -c1-400 | head -6
  date -u
done
f=$OUT/$R/batch-qwen3-0.6b-q4
RUST_LOG=mlxd=info timeout 220 $T mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --model-kernels fused --prompt 128 --gen 64 --repeats 3 --stagger 8 --json $f.json > $f.txt 2>&1
echo "batch rc=$?"; grep -E "fused|^\| [0-9]|rror|panick|WARN" $f.txt | cut -c1-400 | head -24
date -u
for fb in 1 0; do
  f=$OUT/$R/serve-qwen3-0.6b-q4-fusedbatch$fb
  MLXD_FUSED_BATCH=$fb timeout 300 $T mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,4,8 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
  echo "serve fused batch=$fb rc=$?"; grep -vE "^\s*$" $f.txt | grep -v "^mlx_lm.server\|^mlxd [0-9]" | tail -14
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
