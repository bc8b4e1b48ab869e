#!/usr/bin/env bash
# Thirty-first session, call b: after the stats' kept-pair count moved to the call's device copy (and is memoized per
# mask): the reuse-step profile again (CogVideoX 1.5), then whole AdaSpa steps on both joint models, fa4 and Triton.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
(cd bench && timeout 200 python3 reuse_step_profile.py --out $OUT/run --model cogvideox-1.5 --length 2x \
  --backends fa4 triton fa4 triton --repeats 3) > $OUT/run/profile-cogvideox.log 2>&1
echo "profile cogvideox rc=$? at $(( $(date +%s) - start )) s"
grep -E "^(fa4|triton):" $OUT/run/profile-cogvideox.log
for run in cogvideox-1.5:fa4 cogvideox-1.5:triton hv15:fa4 hv15:triton; do
  model=${run%%:*}; backend=${run##*:}
  left=$(( 560 - ($(date +%s) - start) ))
  [ $left -gt 70 ] || { echo "skip $model $backend: time"; continue; }
  timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 2x --modes eager --methods adaspa \
    --backend $backend --budget-s $(( left - 20 )) --out $OUT/run --tag=-$model-adaspa-$backend \
    > $OUT/run/e2e-$model-adaspa-$backend.log 2>&1
  echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*$model-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
done
cd $OUT && tar czf run.tgz run && rm -rf run
