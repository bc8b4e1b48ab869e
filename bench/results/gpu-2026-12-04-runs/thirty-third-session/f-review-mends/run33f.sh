#!/usr/bin/env bash
# Thirty-third session, call f: the review's mends on the GPU: tests/test_padding.py and tests/test_cuda_selection.py
# on every CUDA target (fa4 included), and the padding probe's classes and times on the mended class rule.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_padding.py tests/test_cuda_selection.py -rs \
  > $OUT/run/gpu-tests-padding.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -1 $OUT/run/gpu-tests-padding.log
timeout 200 python3 bench/padding_probe.py --out $OUT/run > $OUT/run/padding-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; grep "^|" $OUT/run/padding-probe.log
cd $OUT && tar czf run.tgz run && rm -rf run
