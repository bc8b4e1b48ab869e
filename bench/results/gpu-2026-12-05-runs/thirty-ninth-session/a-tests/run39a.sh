#!/usr/bin/env bash
# Thirty-ninth session, call a (FA4 staged): what the thirty-eighth session's GPU time did not reach. The diffusers
# op's 0-d tensor slot under mode="reduce-overhead" (partitioned and not), the realistic masks on every CUDA target
# but FlashInfer, then fa4's property cases with the time left. Each file in its own time limit, verbose.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $R/gpu.txt
start=$(date +%s)
t() { local limit=$1 name=$2; shift 2
  timeout $limit python3 -P -m pytest -v -p no:cacheprovider -rfE --tb=short "$@" > $R/gpu-tests-$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - start )) s: $(grep -c PASSED $R/gpu-tests-$name.log) passed," \
       "$(grep -c FAILED $R/gpu-tests-$name.log) failed, $(grep -c SKIPPED $R/gpu-tests-$name.log) skipped"
  grep -E "^FAILED|^ERROR" $R/gpu-tests-$name.log | head -5 | cut -c1-300; }
t 150 compile tests/test_integration_compile.py
t 150 realistic tests/test_large_masks.py -k "realistic and cuda and not flashinfer"
left=$(( 560 - ($(date +%s) - start) ))
(( left > 30 )) && t $left fa4-property tests/test_backends_match_oracle.py tests/test_unselected_match_oracle.py \
  -k "fa4 and not emulated"
cd $OUT && tar czf run.tgz run && rm -rf run
