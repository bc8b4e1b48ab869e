#!/usr/bin/env bash
# Thirty-ninth session, call c (no FA4 staged): the diffusers op with its new layer argument on CUDA (reduce-overhead,
# partitioned or not; the capture refusal), the block-cache tests, and the integration's CUDA tests.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
start=$(date +%s)
source bench/gpu_pytest.sh
t 90 reduce-overhead tests/test_integration_compile.py -k "reduce_overhead or cuda_graph"
t 120 integration-cuda tests/test_integration_block_caches.py tests/test_integration_diffusers.py \
  tests/test_integration_gaps.py tests/test_text_groups.py -k "cuda or gpu or block_caches or cache"
cd $OUT && tar czf run.tgz run && rm -rf run
