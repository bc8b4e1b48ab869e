#!/usr/bin/env bash
# Fortieth session's prepared call (no FA4 staged; FlashInfer's targets left out: its JIT takes minutes on a fresh
# machine). Not run: loans were paused all session. What it checks on CUDA:
# - the thirty-ninth session's op change (the layer argument): reduce-overhead partitioned or not, the capture
#   refusal and the integration's CUDA tests (run39c.sh's two commands, its selection mended; the block-cache
#   tests have no CUDA code: CPU CI runs them);
# - this session's library changes: the portable lowering's index_select gathers (its CUDA targets against the
#   float64 oracle, drop-only and approximating), and the IR's derived masks on a real device (device lists: slices,
#   head selections, the int32 refusals, read-only host lists, device-index refusal on a one-GPU machine);
# - the Triton review's fixes: TMA with an unaligned contiguous q (an aligned copy for the descriptor), the GPU
#   approximation tiles, the full-tile bound, the approximation pass's tile decision kept per process.
# Usage (device tool, carry [".whl"]): python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
#   --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
#   bash bench/results/gpu-2026-12-05-runs/fortieth-session/a/run40a.sh
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
start=$(date +%s)
source bench/gpu_pytest.sh
# Limits sum to 510 s of the call's 600 (install, nvidia-smi and the tar need the rest). run39c's "-k ... cache"
# picked 31 CPU tests (ids with "cached") and left out the CUDA-only host-memory test: this selection fixes that.
t 80 reduce-overhead tests/test_integration_compile.py -k "reduce_overhead or cuda_graph"
t 100 integration-cuda tests/test_integration_diffusers.py tests/test_integration_gaps.py tests/test_text_groups.py \
  -k "cuda or gpu or host_memory"
t 120 portable-cuda tests/test_backends_match_oracle.py tests/test_unselected_match_oracle.py \
  tests/test_nonfinite_isolation.py -k "portable and cuda"
t 90 ir-device tests/test_block_mask_device.py tests/test_hostile_ir.py tests/test_ir_slicing.py
t 120 triton-paths tests/test_triton_gpu_paths.py tests/test_cuda_tiling.py tests/test_approximation_triton.py
cd $OUT && tar czf run.tgz run && rm -rf run
