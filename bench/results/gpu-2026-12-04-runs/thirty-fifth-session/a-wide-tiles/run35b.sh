#!/usr/bin/env bash
# Thirty-fifth session, call b: the approximation pass with tiles of 64 and 128 blocks (a row reads one word of the
# packed block map per 32 blocks): GPU tests of the pass, then PASA's 6x mask swept over tile configs.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > $OUT/run/gpu.txt
timeout 200 env HYPOTHESIS_PROFILE=gpu-quick python3 -m pytest -q -p no:cacheprovider \
  tests/test_approximation_triton.py tests/test_unselected_match_oracle.py > $OUT/run/gpu-tests-approximation.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests-approximation.log
timeout $(( 580 - ($(date +%s) - start) )) python3 bench/approximation_benchmark.py --sizes 188760 --sweep --no-check \
  --out $OUT/run > $OUT/run/approximation-sweep.log 2>&1
echo "sweep rc=$? at $(( $(date +%s) - start )) s"; grep -E "^1[0-9]{2}x|^[0-9]+x[0-9]+ w" $OUT/run/approximation-sweep.log
grep "^|" $OUT/run/approximation-*.md | tail -24
cd $OUT && tar czf run.tgz run && rm -rf run
