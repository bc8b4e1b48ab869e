#!/usr/bin/env bash
# Thirty-eighth session, call b (FA4 staged): what call a's limits cut, each file in its own time limit, verbose.
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
t 100 large tests/test_large_masks.py -k "cuda or gpu or device"
t 90 warmup-cli tests/test_warmup.py tests/test_cli.py -k "cuda or gpu or device"
t 100 compiled tests/test_torch_compile_kernel.py -k "cuda or gpu or device"
t 80 unselected tests/test_unselected_match_oracle.py -k "cuda and not emulated and not flashinfer and fa4"
cd $OUT && tar czf run.tgz run && rm -rf run
