#!/bin/bash
# Session 15, run 3: where the fused block's device time goes. Nsight Compute on the kernel as
# the GPU runs it (phase 0: all five with barriers) and with each phase launched on its own
# (MLXD_FUSED_PHASES=1), 4-bit Qwen3-0.6B, a prompt of 128.
source .device/payload/env.sh
R=r3
mkdir -p $OUT/$R
date -u
timeout 200 mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 16 --repeats 1 --samplers greedy --cache-prompt 0 > $OUT/$R/warm.txt 2>&1
echo "build rc=$?"
timeout 150 ncu --kernel-name regex:mlxd_fused --launch-skip 500 --launch-count 6 --section SpeedOfLight --section Occupancy mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 64 --repeats 1 --samplers greedy --cache-prompt 0 > $OUT/$R/ncu-all.txt 2>&1
echo "ncu all rc=$?"; grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Limit Reg" $OUT/$R/ncu-all.txt | head -14
MLXD_FUSED_PHASES=1 timeout 200 ncu --kernel-name regex:mlxd_fused --launch-skip 3000 --launch-count 10 --section SpeedOfLight mlxd-bench engine --shape qwen3-0.6b --dtype q4 --dir /root/models --prompt 128 --gen 64 --repeats 1 --samplers greedy --cache-prompt 0 > $OUT/$R/ncu-phases.txt 2>&1
echo "ncu phases rc=$?"; grep -E "custom_kernel|Duration|DRAM Throughput" $OUT/$R/ncu-phases.txt | sed 's/(const.*//' | head -40
date -u
cd $OUT && tar czf $R.tgz $R && rm -rf $R
