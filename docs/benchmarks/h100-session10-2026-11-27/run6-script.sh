#!/bin/bash
# Which commit made the daemon's many-client steps cost twice the host time: the same serve
# test (Qwen3-0.6B bf16, 64-token prompts, 256 tokens, 1/8/16 clients) with HEAD's bench client
# driving each version's daemon, interleaved in two rounds.
P=.device/payload; L="$OUT/ab-log.txt"; M=/root/models
mkdir -p "$OUT" "$M"
for f in $P/*.xz $P/v/*.xz; do xz -d -k -f "$f"; done
chmod +x $P/mlxd-bench $P/mlxd $P/mlxd-engine
for c in b2f6e1c 6c6e5b9 9c9e7cb 1decc59; do
  mkdir -p /root/v/$c && cp $P/mlxd-bench /root/v/$c/ && cp $P/v/$c-mlxd /root/v/$c/mlxd && cp $P/v/$c-mlxd-engine /root/v/$c/mlxd-engine && chmod +x /root/v/$c/*
done
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u +%FT%TZ; cat $P/commit.txt; } > "$L"
for round in 1 2; do
  for v in HEAD b2f6e1c 6c6e5b9 9c9e7cb 1decc59; do
    d=/root/v/$v; [ $v = HEAD ] && d=$P
    timeout 100 taskset -c 0-7 $d/mlxd-bench serve --shape qwen3-0.6b --dtype bf16 --dir $M --clients 1,8,16 --prompt 64 --gen 256 --no-mlx-lm > "$OUT/serve-$v-$round.txt" 2>&1
    echo "round $round $v rc=$? $(grep -oE '^mlxd [0-9]+ clients|"aggregate_tps":[0-9.]+|"host_build_ms_per_step":[0-9.]+' "$OUT/serve-$v-$round.txt" | tr '\n' ' ')" >> "$L"
  done
done
cat "$L"
