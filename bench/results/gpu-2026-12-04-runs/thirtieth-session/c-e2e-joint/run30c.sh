#!/usr/bin/env bash
# Thirtieth session, call 2 (after FA4's two stages): the review fixes and the stepped tile-lists kernel.
# The conversion probe again (baseline: the conversion at 6e5b348), the GPU tests of the conversion and of
# fa4 against the float64 oracle, then whole AdaSpa steps of the joint models on fa4 and on Triton (eager, 2x).
set -u
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
timeout 120 python3 bench/fa4_conversion_probe.py --out $OUT/run --baseline .fa4/2/old_fa4_layout.py \
  > $OUT/run/fa4-conversion-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; grep "^|" $OUT/run/fa4-conversion-probe.log | cut -c1-160
for model in hv15 cogvideox-1.5; do
  for backend in fa4 triton; do
    left=$(( 420 - ($(date +%s) - start) ))
    [ $left -gt 60 ] || { echo "skip $model $backend: time"; continue; }
    timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 2x --modes eager --methods adaspa \
      --backend $backend --budget-s $(( left - 20 )) --out $OUT/run --tag=-$model-adaspa-$backend \
      > $OUT/run/e2e-$model-adaspa-$backend.log 2>&1
    echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
    grep "| adaspa" $OUT/run/e2e-*$model-adaspa-$backend*.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
  done
done
timeout $(( 560 - ($(date +%s) - start) )) python3 -m pytest -q -p no:cacheprovider tests/test_fa4_tile_lists.py \
  tests/test_fa4_layout.py tests/test_backends_match_oracle.py -k "fa4 or tile_lists or geometry" \
  > $OUT/run/gpu-tests-fa4.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -2 $OUT/run/gpu-tests-fa4.log | cut -c1-300
cd $OUT && tar czf run.tgz run && rm -rf run         # $OUT brings back at most ~8 files: one archive
