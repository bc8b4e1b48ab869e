#!/usr/bin/env bash
# Reproduce the GPU results on a lent GPU machine (see shared/device/README.md):
#   bash bench/run_gpu.sh STAGE...      stages: warm test sweep bench
# warm:  JIT-compile FlashInfer's fa3 modules (bf16/fp16 x head dim 64/128) in the background; wait: join them
# diag-triton, diag-flashinfer: bench/gpu_diagnostics.py; block-mass: bench/block_mass_device.py (AdaSpa search)
# test:  the property suite and the realistic-mask tests on every CUDA target
# sweep: Triton tile configs at S=32768 and on the LVSA frame mask (no FlashInfer)
# bench: the full side-by-side table (writes cuda-<date>.json/.md under $OUT)
# e2e:   bench/e2e_benchmark.py, Wan / HunyuanVideo 1.5 transformer steps (writes e2e-<date>.json/.md)
# multigpu: bench/multigpu_benchmark.py, one GPU vs all GPUs under diffusers Ulysses (writes multigpu-<date>.*)
# Needs the wheels in .whl/ (shared/device/fetch-wheels.sh) carried with the tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# The package-dir mapping of pyproject.toml as a symlink tree: no build step, the image's torch stays.
mkdir -p /tmp/pkg/sparsecore
for f in sparsecore/*; do ln -sfn "$PWD/$f" /tmp/pkg/sparsecore/; done
ln -sfn "$PWD/ir" /tmp/pkg/sparsecore/ir
ln -sfn "$PWD/backends" /tmp/pkg/sparsecore/backends
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 MAX_JOBS=16 FLASHINFER_WORKSPACE_BASE=$PWD/.flashinfer-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    warm)
      for dtype in bfloat16 float16; do for dim in 128 64; do
        python3 bench/flashinfer_warmup.py $dtype $dim > "$OUT/warm-$dtype-$dim.log" 2>&1 &
      done; done ;;
    wait) wait; cat "$OUT"/warm-*.log | grep -E "warm:|Error" ;;
    test)
      HYPOTHESIS_PROFILE=ci python3 -P -m pytest -q -p no:cacheprovider tests/test_backends_match_oracle.py \
        tests/test_large_masks.py -k "${TEST_FILTER:-cuda and not emulated}" > "$OUT/gpu-tests-${TEST_TAG:-all}.log" 2>&1; tail -25 "$OUT/gpu-tests-${TEST_TAG:-all}.log" ;;
    diag-triton) python3 bench/gpu_diagnostics.py triton 2>&1 | tee "$OUT/diag-triton.log" ;;
    diag-flashinfer) python3 bench/gpu_diagnostics.py flashinfer 2>&1 | tee "$OUT/diag-flashinfer.log" ;;
    block-mass) python3 bench/block_mass_device.py --out "$OUT" 2>&1 | tail -40 ;;
    e2e) python3 bench/flashinfer_warmup.py bfloat16 128 && python3 bench/e2e_benchmark.py --out "$OUT" --budget-s ${E2E_BUDGET:-360} ;;
    sweep) python3 bench/cuda_benchmark.py --out "$OUT/sweep" --sizes 32768 --sweep --no-flashinfer --frames ;;
    bench) python3 bench/cuda_benchmark.py --out "$OUT" --frames ;;
    multigpu)
      # NVLink multicast stays off on shared hosts (shared/device KINDS.md)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
      python3 bench/flashinfer_warmup.py bfloat16 128
      for run in "wan-1.3b lvsa" "wan-14b lvsa --layers ${LAYERS_14B:-10}" "wan-1.3b adaspa" "wan-1.3b dense"; do
        read -r model method extra <<< "$run"
        python3 bench/multigpu_benchmark.py --model $model --method $method --out "$OUT/multigpu" $extra 2>&1 \
          | grep -v '^{'
        python3 -m torch.distributed.run --nproc_per_node "$gpus" bench/multigpu_benchmark.py --model $model \
          --method $method --out "$OUT/multigpu" $extra 2>&1 | grep -v '^{'
      done
      python3 bench/multigpu_benchmark.py --report "$OUT/multigpu" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
