#!/bin/bash
# Session 15, run 5: the daemon with the fused decode block (HEAD): 1, 2 and 8 WebSocket clients
# on 4-bit Qwen3-0.6B against mlx_lm.server; one client decodes through the fused block, several
# through the batched kernels, and the daemon moves caches between the two as clients come and go.
source .device/payload/env.sh
R=r5
mkdir -p $OUT/$R
date -u
f=$OUT/$R/serve-qwen3-0.6b-q4
timeout 280 taskset -c 0-7 mlxd-bench serve --shape qwen3-0.6b --dtype q4 --dir /root/models --clients 1,2,8 --prompt 64 --gen 128 --json $f.json > $f.txt 2>&1
echo "serve rc=$?"; grep -vE "^\s*$" $f.txt | tail -14
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
