#!/bin/bash
# Session 18, run 6: the real SmolLM2-135M-Instruct Q4_1 GGUF (the default model) on the GPU
# at this session's code: the suite's single-stream rows (greedy, full sampling, pass-through
# and DRY plugins, prompt cache). mlx-lm reads no GGUF, so mlxd only. The file came in two
# transfers and was joined here (sha256 checked first).
source .device/payload/env.sh
T="taskset -c 0-7"
R=r6
mkdir -p $OUT/$R
date -u
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/models/smollm2.gguf" | sha256sum -c || exit 1
f=$OUT/$R/suite-smollm2
RUST_LOG=warn,mlxd::models=info timeout 180 $T mlxd-bench suite --models SmolLM2-135M-Instruct=/root/models/smollm2.gguf --serve-model none --prompt 128 --gen 256 --repeats 5 --json $f.json > $f.txt 2>&1
echo "suite rc=$?"; grep -E "^\||rror|panick|prepared|ceiling|bandwidth" $f.txt | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-260 | head -30
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
