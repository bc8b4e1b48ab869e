#!/usr/bin/env bash
# Thirtieth session, call 2 of a second staging: keep_bits without its host copy (a second wait per layout). Whole
# AdaSpa reuse steps again (HunyuanVideo 1.5 on fa4 and Triton, CogVideoX 1.5 on fa4), then the conversion's GPU
# tests (the wait count, the recompile count).
set -u
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
for run in hv15:fa4 hv15:triton cogvideox-1.5:fa4; do
  model=${run%%:*}; backend=${run##*:}
  left=$(( 330 - ($(date +%s) - start) ))
  [ $left -gt 60 ] || { echo "skip $model $backend: time"; continue; }
  timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 2x --modes eager --methods adaspa \
    --backend $backend --budget-s $(( left - 20 )) --out $OUT/run --tag=-$model-adaspa-$backend \
    > $OUT/run/e2e-$model-adaspa-$backend.log 2>&1
  echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
  grep "| adaspa" $OUT/run/e2e-*$model-adaspa-$backend*.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
done
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_fa4_tile_lists.py tests/test_fa4_layout.py \
  -k "waits or new_length or tile_lists or heads_alike" > $OUT/run/gpu-tests-conversion.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests-conversion.log | cut -c1-400
cd $OUT && tar czf run.tgz run && rm -rf run         # $OUT brings back at most ~8 files: one archive
