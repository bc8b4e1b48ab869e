#!/usr/bin/env bash
# Twenty-fifth session, call 2 (after FA4's two stages): the fa4 lowering now passes FA4 a head-major out= (no copy in
# the diffusers op). Its GPU tests, then fa4_check (exactness checks and the kernel table, FA4's own call beside ours).
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
timeout 200 python3 bench/fa4_check.py --out $OUT/run > $OUT/run/fa4-check-run.log 2>&1
grep -v "UserWarning\|exe_args" $OUT/run/fa4-check-run.log | tail -30 | cut -c1-220
timeout 250 python3 -m pytest -q -p no:cacheprovider -x tests/test_fa4_layout.py tests/test_backends_match_oracle.py \
  tests/test_prepare_scale.py -k "fa4" > $OUT/run/gpu-tests-fa4.log 2>&1
tail -4 $OUT/run/gpu-tests-fa4.log
