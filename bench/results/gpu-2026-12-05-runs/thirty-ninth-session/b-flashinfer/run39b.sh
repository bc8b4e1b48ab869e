#!/usr/bin/env bash
# Thirty-ninth session, call b: the diffusers op under mode="reduce-overhead" (call a ran the rest of its file
# first, and its limit came before it), then FlashInfer's targets (left out of the last sessions' calls: its JIT
# takes minutes on a fresh machine). Its kernels are warmed first by the realistic masks, then the properties.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick SPARSECORE_WARMUP=wait MAX_JOBS=16
R=$OUT/run; mkdir -p $R
start=$(date +%s)
t() { local limit=$1 name=$2; shift 2
  timeout $limit python3 -P -m pytest -v -p no:cacheprovider -rfE --tb=short "$@" > $R/gpu-tests-$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - start )) s: $(grep -c PASSED $R/gpu-tests-$name.log) passed," \
       "$(grep -c FAILED $R/gpu-tests-$name.log) failed, $(grep -c SKIPPED $R/gpu-tests-$name.log) skipped"
  grep -E "^FAILED|^ERROR" $R/gpu-tests-$name.log | head -5 | cut -c1-300; }
t 150 reduce-overhead tests/test_integration_compile.py -k "reduce_overhead or cuda_graph"
t 260 flashinfer-realistic tests/test_large_masks.py -k "realistic and flashinfer"
left=$(( 560 - ($(date +%s) - start) ))
(( left > 30 )) && t $left flashinfer-property tests/test_backends_match_oracle.py tests/test_nonfinite_isolation.py \
  -k "flashinfer and not emulated"
cd $OUT && tar czf run.tgz run && rm -rf run
