#!/usr/bin/env bash
# Forty-eighth session, call d (if device time is left): the approximating masks against the float64 oracle on the
# Triton lowering (the selection by shared memory reads the device's figure now).
set -u
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 \
  TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
start=$(date +%s); R=$OUT/d; mkdir -p $R
source bench/gpu_pytest.sh
t ${LIMIT:-200} approx tests/test_unselected_match_oracle.py tests/test_shared_memory.py -k "triton or shared"
