#!/usr/bin/env bash
# Thirty-eighth session, call c: Triton's nonfinite isolation, the device masks and the integration on CUDA.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
start=$(date +%s)
t() { local limit=$1 name=$2; shift 2
  timeout $limit python3 -P -m pytest -v -p no:cacheprovider -rfE --tb=short "$@" > $R/gpu-tests-$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - start )) s: $(grep -c PASSED $R/gpu-tests-$name.log) passed," \
       "$(grep -c FAILED $R/gpu-tests-$name.log) failed, $(grep -c SKIPPED $R/gpu-tests-$name.log) skipped"
  grep -E "^FAILED|^ERROR" $R/gpu-tests-$name.log | head -5 | cut -c1-300; }
t 140 nonfinite tests/test_nonfinite_isolation.py -k "cuda and not emulated and not flashinfer"
t 150 nonfinite-triton tests/test_nonfinite_isolation.py -k "cuda and triton and not emulated"
t 70 device-masks tests/test_block_mask_device.py
t 100 integration tests/test_integration_diffusers.py tests/test_hostile_apply.py -k "cuda or gpu"
cd $OUT && tar czf run.tgz run && rm -rf run
