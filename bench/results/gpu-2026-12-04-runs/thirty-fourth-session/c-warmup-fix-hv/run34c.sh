#!/usr/bin/env bash
# Thirty-fourth session, call c: after the warm-up fix (every valid text length of the batch warmed before the
# search step): Mochi 1x, 40-token prompt, classifier-free guidance's batch of two (negative prompt zeroed), AdaSpa
# eager on the default backend (fa4) and Triton; then HunyuanVideo 1.0 (720p, 129 frames), 40-token prompt, the
# same two, as far as the call's time goes.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
for model in mochi hv; do
  for backend in default triton; do
    left=$(( 575 - ($(date +%s) - start) ))
    [ $left -gt 80 ] || { echo "skip $model $backend: time"; continue; }
    opt=""; [ $backend = default ] || opt="--backend $backend"
    neg=""; [ $model = hv ] || neg="--negative-tokens 0"
    tag=$model-prompt40-$([ $model = hv ] && echo one || echo cfg)-eager-adaspa-$backend
    timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 1x --modes eager --methods adaspa \
      --prompt-tokens 40 $neg $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag > $OUT/run/e2e-$tag.log 2>&1
    echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
    grep -h "| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
  done
done
cd $OUT && tar czf run.tgz run && rm -rf run
