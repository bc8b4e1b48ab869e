#!/usr/bin/env bash
# Thirty-eighth session, call a (FA4 staged): sessions 36-37 ran on CPU only. Here, at 1a28fdc: the CUDA tests of the
# files they changed, then the property / nonfinite / approximating suites on every CUDA target but FlashInfer
# (gpu-quick), then fa4check with the time left.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
start=$(date +%s)
timeout 200 python3 -P -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_block_mask_device.py \
  tests/test_compile_api.py tests/test_torch_compile_kernel.py tests/test_warmup.py tests/test_large_masks.py \
  tests/test_cli.py -k "cuda or gpu or device" > $R/gpu-tests-changed.log 2>&1
echo "changed rc=$? at $(( $(date +%s) - start )) s"; tail -4 $R/gpu-tests-changed.log | cut -c1-300
timeout 300 python3 -P -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_nonfinite_isolation.py \
  tests/test_backends_match_oracle.py tests/test_unselected_match_oracle.py \
  -k "cuda and not emulated and not flashinfer" > $R/gpu-tests-property.log 2>&1
echo "property rc=$? at $(( $(date +%s) - start )) s"; tail -4 $R/gpu-tests-property.log | cut -c1-300
grep -c PASSED $R/gpu-tests-property.log; grep -E "FAILED|Error" $R/gpu-tests-*.log | head -10 | cut -c1-300
left=$(( 570 - ($(date +%s) - start) ))
if (( left > 40 )); then timeout $left python3 bench/fa4_check.py --out $R > $R/fa4check.txt 2>&1
  echo "fa4check rc=$? at $(( $(date +%s) - start )) s"; tail -20 $R/fa4check.txt | cut -c1-200; fi
cd $OUT && tar czf run.tgz run && rm -rf run
