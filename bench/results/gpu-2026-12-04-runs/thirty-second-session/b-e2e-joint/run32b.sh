#!/usr/bin/env bash
# Thirty-second session, call b: whole AdaSpa steps (e2e, eager, 2x) on both joint models, fa4 and Triton, after the
# session's conversion changes; joint masks' selection follows these.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
for run in cogvideox-1.5:fa4 cogvideox-1.5:triton hv15:fa4 hv15:triton; do
  model=${run%%:*}; backend=${run##*:}
  left=$(( 565 - ($(date +%s) - start) ))
  [ $left -gt 70 ] || { echo "skip $model $backend: time"; continue; }
  timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 2x --modes eager --methods adaspa \
    --backend $backend --budget-s $(( left - 20 )) --out $OUT/run --tag=-$model-adaspa-$backend \
    > $OUT/run/e2e-$model-adaspa-$backend.log 2>&1
  echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*$model-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
done
left=$(( 570 - ($(date +%s) - start) ))
export HYPOTHESIS_PROFILE=gpu-quick
timeout $left python3 -m pytest -q -p no:cacheprovider -rs tests/test_fa4_tile_lists.py tests/test_fa4_layout.py tests/test_block_mask_device.py tests/test_integration_gaps.py > $OUT/run/gpu-tests-b.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests-b.log | cut -c1-300
cd $OUT && tar czf run.tgz run && rm -rf run
