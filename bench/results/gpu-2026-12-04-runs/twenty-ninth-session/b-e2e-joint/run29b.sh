#!/usr/bin/env bash
# Twenty-ninth session, call 2 (after FA4's two stages): with the fa4 conversion's Triton classification, whole
# AdaSpa steps on the joint models (each layer's held mask compiled at every reuse call) on fa4 and on Triton
# side by side (eager, 2x), to decide compile's ranking of joint masks again (backends/cuda/selection.py).
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
for model in hv15 cogvideox-1.5; do
  for backend in fa4 triton; do
    left=$(( 560 - ($(date +%s) - start) ))
    [ $left -gt 60 ] || { echo "skip $model $backend: time"; continue; }
    timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 2x --modes eager --methods adaspa \
      --backend $backend --budget-s $(( left - 20 )) --out $OUT/run --tag=-$model-adaspa-$backend \
      > $OUT/run/e2e-$model-adaspa-$backend.log 2>&1
    echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
    grep "| adaspa" $OUT/run/e2e-*$model-adaspa-$backend*.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
  done
done
