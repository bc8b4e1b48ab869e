#!/usr/bin/env bash
# Reproduce the GPU results on a lent GPU machine (see shared/device/README.md):
#   bash bench/run_gpu.sh STAGE...      stages: warm test sweep bench
# warm:  JIT-compile FlashInfer's fa3 modules (bf16/fp16 x head dim 64/128) in the background; wait: join them
# diag-triton, diag-flashinfer: bench/gpu_diagnostics.py; block-mass: bench/block_mass_device.py (AdaSpa search)
# test:  the property suite and the realistic-mask tests on every CUDA target
# sweep: Triton tile configs at S=32768 and on the LVSA frame mask (no FlashInfer)
# bench: the full side-by-side table (writes cuda-<date>.json/.md under $OUT)
# e2e:   bench/e2e_benchmark.py, Wan / HunyuanVideo 1.5 transformer steps (writes e2e-<date>.json/.md)
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
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
