#!/usr/bin/env bash
# Thirty-third session, call g: the second review's mends (0c344b6) on the GPU: tests/test_padding.py,
# tests/test_cuda_selection.py and tests/test_host_facts.py on every CUDA target, fa4 included.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_padding.py tests/test_cuda_selection.py \
  tests/test_host_facts.py -rs > $OUT/run/gpu-tests-final.log 2>&1
echo "tests rc=$?"; tail -1 $OUT/run/gpu-tests-final.log
cd $OUT && tar czf run.tgz run && rm -rf run
