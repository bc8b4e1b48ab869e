#!/usr/bin/env bash
# Thirty-fourth session, call f: Mochi 1x, classifier-free guidance's batch (40-token prompt, negative prompt zeroed),
# AdaSpa compiled (each block's compile(fullgraph=True) on both sides), the default backend (fa4) against Triton.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
for backend in default triton; do
  left=$(( 570 - ($(date +%s) - start) ))
  [ $left -gt 90 ] || { echo "skip e2e $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  tag=mochi-prompt40-cfg-compiled-adaspa-$backend
  timeout $left python3 bench/e2e_benchmark.py --models mochi --lengths 1x --modes compiled --methods adaspa \
    --prompt-tokens 40 --negative-tokens 0 $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag \
    > $OUT/run/e2e-$tag.log 2>&1
  echo "e2e $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
done
cd $OUT && tar czf run.tgz run && rm -rf run
