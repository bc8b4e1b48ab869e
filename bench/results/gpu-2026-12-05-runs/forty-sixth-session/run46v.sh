#!/usr/bin/env bash
# Forty-sixth session, call v (no FA4, about 3 minutes; not run: the session's device time was spent): the readers' GPU
# test as rewritten after the review (the allocator's choice checked while the read is still queued), then the same
# test with the uploads memo retiring nothing (readers_before.py: must fail), then run46t's cases that failed there:
# the statistics test with its mended bound and, with diffusers installed, the padded-sequence integration cases and
# the cuDNN check's cases.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/pip.log 2>&1 || { echo "pip failed"; tail -3 /tmp/pip.log; }
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait \
  HYPOTHESIS_PROFILE=gpu-quick
D46=bench/results/gpu-2026-12-05-runs/forty-sixth-session
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_stream_readers.py -rfE > $R/readers.log 2>&1
echo "readers rc=$?"; tail -2 $R/readers.log
timeout 30 python3 $D46/readers_before.py > $R/readers-before.log 2>&1; echo "readers before rc=$?"
tail -2 $R/readers-before.log
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_approximation_triton.py tests/test_unselected_parts.py \
  -rfE > $R/approximation-triton.log 2>&1; echo "approximation rc=$?"; tail -3 $R/approximation-triton.log
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_dense_attention.py -k cudnn -rfE \
  > $R/dense-cudnn.log 2>&1; echo "dense rc=$?"; tail -3 $R/dense-cudnn.log
cd $OUT && tar czf run.tgz run && rm -rf run
