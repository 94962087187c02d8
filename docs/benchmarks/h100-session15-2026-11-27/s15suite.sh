#!/bin/bash
# Session 15, suite run: mlxd-bench suite on the 4-bit shapes (no load test) with the fused
# decode block (kept where it is faster at load), then the alternate run on 4-bit Qwen3-0.6B.
source .device/payload/env.sh
mkdir -p $OUT/suite
date -u
MLXD_COMMIT=$(cat .device/payload/commit.txt | head -1) timeout 420 taskset -c 0-7 mlxd-bench suite --models qwen3-0.6b:q4,llama-3.2-1b:q4 --serve-model none --repeats 8 --dir /root/models --json $OUT/suite/suite-q4.json > $OUT/suite/suite-q4.txt 2>&1
echo "rc=$?"; grep -E "one-sequence|greedy|bandwidth|rror" $OUT/suite/suite-q4.txt | head -30
date -u
cd $OUT && tar czf suite.tgz suite && rm -rf suite
