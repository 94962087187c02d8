#!/bin/bash
# Session 10, last run: longer paired rounds for full sampling and DRY (greedy / full / DRY only,
# 50 rotating rounds of 48 tokens, Qwen3-0.6B bf16 and Llama-3.2-1B bf16, mlx-lm beside), then
# the daemon at HEAD against 6c6e5b9 at 1 and 16 clients, three interleaved rounds.
P=.device/payload; M=/root/models; L="$OUT/log.txt"
mkdir -p "$OUT" "$M"
for f in $P/*.xz $P/v/*.xz; do xz -d -k -f "$f"; done
chmod +x $P/mlxd-bench $P/mlxd $P/mlxd-engine
mkdir -p /root/v/6c6e5b9 && cp $P/mlxd-bench /root/v/6c6e5b9/ && cp $P/v/6c6e5b9-mlxd /root/v/6c6e5b9/mlxd && cp $P/v/6c6e5b9-mlxd-engine /root/v/6c6e5b9/mlxd-engine && chmod +x /root/v/6c6e5b9/*
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ; cat $P/commit.txt; } > "$L"
for spec in qwen3-0.6b:bf16 llama-3.2-1b:bf16; do
  shape=${spec%%:*}; dtype=${spec##*:}
  echo "== $spec $(date -u +%T)" >> "$L"
  timeout 170 taskset -c 0-7 $P/mlxd-bench engine --shape $shape --dtype $dtype --dir $M --prompt 128 --gen 48 \
    --repeats 50 --samplers greedy,full --plugin 'dry:{"multiplier":0.8}' --cache-prompt 0 \
    --json "$OUT/e-$shape-$dtype.json" > "$OUT/e-$shape-$dtype.txt" 2>&1
  echo "rc=$?" >> "$L"
  grep -E 'run by run|x$|host build' "$OUT/e-$shape-$dtype.txt" >> "$L"
done
for round in 1 2 3; do
  for v in HEAD 6c6e5b9; do
    d=/root/v/$v; [ $v = HEAD ] && d=$P
    timeout 60 taskset -c 0-7 $d/mlxd-bench serve --shape qwen3-0.6b --dtype bf16 --dir $M --clients 1,16 --prompt 64 --gen 256 --no-mlx-lm > "$OUT/serve-$v-$round.txt" 2>&1
    echo "round $round $v rc=$? $(grep -oE '^mlxd [0-9]+ clients|"aggregate_tps":[0-9.]+|"host_build_ms_per_step":[0-9.]+' "$OUT/serve-$v-$round.txt" | tr '\n' ' ')" >> "$L"
  done
done
date -u +%T >> "$L"
cat "$L"
