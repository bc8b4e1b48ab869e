#!/usr/bin/env bash
# Thirty-second session, call d: HunyuanVideo 1.5's AdaSpa steps compiled on the new default (fa4 for joint masks)
# and on Triton; PASA's sparse step on both joint models, fa4 against Triton (selection keeps PASA's approximating
# joint masks on Triton: is that still right after the session's conversion changes?).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
for model in hv15 cogvideox-1.5; do
  left=$(( 300 - ($(date +%s) - start) ))
  [ $left -gt 60 ] || { echo "skip pasa $model: time"; continue; }
  (cd bench && timeout $left python3 step_profile.py --out $OUT/run --model $model --length 2x --methods pasa \
    --backends fa4 triton --repeats 3) > $OUT/run/profile-$model-pasa.log 2>&1
  echo "$model pasa rc=$? at $(( $(date +%s) - start )) s"
  grep -E "^pasa " $OUT/run/profile-$model-pasa.log
done
for backend in default triton; do
  left=$(( 570 - ($(date +%s) - start) ))
  [ $left -gt 80 ] || { echo "skip compiled $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  timeout $left python3 bench/e2e_benchmark.py --models hv15 --lengths 2x --modes compiled --methods adaspa \
    $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-hv15-compiled-adaspa-$backend \
    > $OUT/run/e2e-hv15-compiled-adaspa-$backend.log 2>&1
  echo "hv15 compiled $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*hv15-compiled-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6,8 | cut -c1-220
done
cd $OUT && tar czf run.tgz run && rm -rf run
