#!/usr/bin/env bash
# Thirty-fourth session, call a: Mochi 1x (163 frames) with a 40-token prompt in its 256 text slots, AdaSpa eager:
# classifier-free guidance's batch of two as MochiPipeline runs it (negative prompt "" zeroed: 0 valid tokens)
# and batch 1, each on the default backend (fa4) and on Triton, in one call.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
for batch in cfg one; do
  for backend in default triton; do
    left=$(( 570 - ($(date +%s) - start) ))
    [ $left -gt 70 ] || { echo "skip $batch $backend: time"; continue; }
    opt=""; [ $backend = default ] || opt="--backend $backend"
    neg=""; [ $batch = one ] || neg="--negative-tokens 0"
    tag=mochi-prompt40-$batch-eager-adaspa-$backend
    timeout $left python3 bench/e2e_benchmark.py --models mochi --modes eager --methods adaspa --prompt-tokens 40 \
      $neg $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag > $OUT/run/e2e-$tag.log 2>&1
    echo "$batch $backend rc=$? at $(( $(date +%s) - start )) s"
    grep -h "| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
  done
done
cd $OUT && tar czf run.tgz run && rm -rf run
