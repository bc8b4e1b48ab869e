#!/usr/bin/env bash
# Thirty-fourth session, call g: the review's mends on the GPU (71ea389 and later): tests/test_text_groups.py (its
# CUDA cases under torch's sync debug mode) and the integration's CUDA test; Mochi's guidance batch profiled
# (step_profile, fa4 and Triton) and its e2e rows again, eager, with the benchmark's padded warm-up.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run/profile
start=$(date +%s)
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_text_groups.py -rs \
  "tests/test_integration_diffusers.py::test_adaspa_masks_kept_in_host_memory_leave_no_lists_on_the_device" > $OUT/run/gpu-tests.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests.log
timeout 150 python3 bench/step_profile.py --model mochi --length 1x --prompt-tokens 40 --negative-tokens 0 \
  --backends default triton --out $OUT/run/profile > $OUT/run/profile/step-profile.log 2>&1
echo "profile rc=$? at $(( $(date +%s) - start )) s"; grep "^adaspa" $OUT/run/profile/step-profile.log
for backend in default triton; do
  left=$(( 400 - ($(date +%s) - start) ))
  [ $left -gt 75 ] || { echo "skip e2e $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  tag=mochi-prompt40-cfg-eager-adaspa-$backend
  timeout $left python3 bench/e2e_benchmark.py --models mochi --lengths 1x --modes eager --methods adaspa \
    --prompt-tokens 40 --negative-tokens 0 $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag \
    > $OUT/run/e2e-$tag.log 2>&1
  echo "e2e $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
done
cd $OUT && tar czf run.tgz run && rm -rf run
