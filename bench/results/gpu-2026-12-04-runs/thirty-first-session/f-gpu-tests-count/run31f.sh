#!/usr/bin/env bash
# Thirty-first session, call f (no FA4): kept_key_tokens' 8-byte path on CUDA (int32 and int64 ids): the device mask
# tests, the conversion's tests (its kept-pair count), the held-mask count on real GPU copies.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_block_mask_device.py tests/test_fa4_tile_lists.py \
  tests/test_integration_gaps.py > $OUT/run/gpu-tests.log 2>&1
echo "tests rc=$?"; tail -6 $OUT/run/gpu-tests.log
cd $OUT && tar czf run.tgz run && rm -rf run
