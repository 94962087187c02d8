#!/bin/bash
# Session 19, run 3: the report's suite on the Llama-3.2-1B shape (bf16, 4-bit) and the real
# SmolLM2-135M-Instruct Q4_1 GGUF (the default model, joined from two transfers and checked by
# sha256; mlx-lm reads no GGUF, so mlxd only). No load test (run 2 has it). Pinned to 8 cores.
source .device/payload/env.sh
R=suite
mkdir -p $OUT/$R
date -u
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/models/smollm2.gguf" | sha256sum -c
f=$OUT/$R/suite-llama-smollm2
MLXD_COMMIT=$(head -1 .device/payload/commit.txt) RUST_LOG=warn,mlxd::models=info timeout 560 taskset -c 0-7 mlxd-bench suite --models SmolLM2-135M-Instruct=/root/models/smollm2.gguf,llama-3.2-1b:q4,llama-3.2-1b:bf16 --serve-model none --repeats 8 --dir /root/models --json $f.json > $f.txt 2>&1
echo "suite rc=$?"; grep -E "done in|rror|panick|^\| [0-9]" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-220 | head -30
date -u
cd $OUT && tar czf r3.tgz $R && rm -rf $R
