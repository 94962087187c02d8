#!/bin/bash
# Session 20, run 3: where a decode step's device time goes outside the fused kernel (one launch
# of all 28 blocks now): Nsight Systems' kernel summary of the engine's one-row and 8-row steps,
# 4-bit Qwen3-0.6B.
source .device/payload/env.sh
R=r3
mkdir -p $OUT/$R
date -u
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
echo "nsys: $NSYS"; ls -d /usr/local/cuda* /opt/nvidia* 2>/dev/null | head
for rows in 1 8; do
  f=$OUT/$R/nsys-$rows
  RUST_LOG=warn timeout 200 $NSYS profile -t cuda -o $f --force-overwrite true mlxd-bench batch --shape qwen3-0.6b --dtype q4 --dir /root/models --clients $rows --model-kernels fused --prompt 64 --gen 128 --repeats 1 --stagger 0 > $f.txt 2>&1
  echo "nsys rows=$rows rc=$?"
  timeout 120 $NSYS stats -r cuda_gpu_kern_sum -f csv -o $f $f.nsys-rep > /dev/null 2>&1
  ls $OUT/$R
  python3 - "$f" <<'PY'
import csv, glob, sys
f = glob.glob(sys.argv[1] + "*kern_sum*.csv")
if not f: print("no summary"); sys.exit()
rows = list(csv.DictReader(open(f[0])))
for r in rows[:14]:
    print(f"{float(r['Time (%)']):5.1f}% total {float(r['Total Time (ns)'])/1e6:8.2f} ms  n {r['Instances']:>6}  avg {float(r['Avg (ns)'])/1e3:8.1f} us  {r['Name'][:110]}")
PY
  rm -f $f.nsys-rep $f.sqlite
  date -u
done
cd $OUT && tar czf $R.tgz $R && rm -rf $R
