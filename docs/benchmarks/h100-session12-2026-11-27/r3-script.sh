#!/bin/bash
# Session 12, run 3 (commit cc9b7b5): the spin guard on (default) and off (MLXD_SPIN_GUARD=0),
# alternating processes, greedy and full sampling, two models.
source .device/payload/env.sh
T="taskset -c 0-7"
mkdir -p $OUT/r3
date -u
for m in qwen3-0.6b:q4 llama-3.2-1b:bf16; do
  s=${m%:*}; d=${m#*:}
  for round in 1 2; do
    for g in 1 0; do
      f=$OUT/r3/engine-$s-$d-guard$g-$round
      MLXD_SPIN_GUARD=$g $T mlxd-bench engine --shape $s --dtype $d --dir /root/models --prompt 128 --gen 48 --repeats 15 --samplers greedy,full --no-mlx-lm --cache-prompt 0 --json $f.json > $f.txt 2>&1
      echo "$m guard=$g round $round: $(grep -E '^\| mlxd \| greedy' $f.txt | cut -d'|' -f4,5) | full: $(grep -E '^\| mlxd \| full' $f.txt | cut -d'|' -f4) | $(grep -E 'costs .*run by run' $f.txt | sed 's/.*costs //;s/ run by run.*//') | $(grep idle $f.txt | sed 's/.*runs: //')"
      grep -E "^mlxd greedy:" $f.txt | sed 's/thread CPU time/cpu/'
    done
  done
  date -u
done
cd $OUT && tar czf r3.tgz r3 && rm -rf r3
