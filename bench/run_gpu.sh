#!/usr/bin/env bash
# Reproduce the GPU results on a lent GPU machine (see shared/device/README.md):
#   bash bench/run_gpu.sh STAGE...
# Needs the wheels in .whl/ (shared/device/fetch-wheels.sh) carried with the tree; FlashAttention-4's
# CuTe DSL libraries staged into /tmp/site first (shared/device/fetch-fa4.sh, fa4-stage.sh 1 and 2).
# Stages:
#   warm       JIT-compile FlashInfer's fa3 modules (bf16/fp16 x head dim 64/128) in the background; wait: join them
#   fa4check   bench/fa4_check.py: the fa4 lowering against float32 dense attention, then its timing
#   test       the property suite, the realistic-mask, non-finite isolation and approximation tests on every
#              CUDA target (HYPOTHESIS_PROFILE=gpu: no shrinking; log under $OUT); run after warm/wait
#   ringslices bench/ring_slices.py: do a rank's ring slices cost half the whole mask (Triton, one GPU)
#   planning   bench/planning_benchmark.py: per-layer planning time at Wan 1x / 6x
#   searchstep bench/search_step.py: AdaSpa's search step, fused pass vs cuDNN dense + block-mass pass
#   bench      bench/cuda_benchmark.py: the side-by-side kernel table (+ LVSA frames, AdaSpa-shaped)
#   selection  bench/cuda_benchmark.py --selection: each CUDA lowering per (block, density, S, head dim)
#   approximation  bench/approximation_benchmark.py: PASA's approximation pass next to the exact kernel
#   occupancy  bench/fa4_occupancy_probe.py: fa4 on 64-token masks at two CTAs per SM against one and Triton
#   keysplit   bench/key_split_probe.py: rate by length, and fa4's key_parts 1/2/4/8 at 6x (L2 capacity)
#   shortrows  bench/short_rows_probe.py: fa4's key_parts 1-4 where rows are short (32K, d = 0.1), against cuDNN
#   tailprobe  bench/tail_probe.py: is FA4's last partial wave a cost at 32K, d = 0.1 (heads 11/12/33, tail tiles
#              split over a side stream)
#   variants   bench/fa4_variant_probe.py: FA4 SM90 kernel variants where rows are short and at 64-token 6x
#              (VARIANT_SET=stages: pipeline depths; persistent, the default: its persistent scheduler, overlap)
#   e2e        bench/e2e_benchmark.py: Wan / HunyuanVideo 1.5 steps and whole generations, eager and compiled
#   memory     bench/memory_profile.py: the live allocations at a PASA / AdaSpa / dense step's peak at 6x
#   held       bench/held_memory.py: what each method keeps allocated between steps (2x compiled; HELD_FLAGS)
#   firstcall  bench/first_call_probe.py: where a first call's seconds go, fresh processes (FIRST_CALL_FLAGS)
#   multigpu   bench/multigpu_benchmark.py: one GPU vs all GPUs (Ulysses, or ring 2 x Ulysses where the heads
#              do not divide), then the ring alone
#   pack       everything under $OUT into $OUT/results.tgz (the device tool returns only a few files of $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
# fa4-stage.sh 2 installs the wheels too: installing them again after it would replace the staged CuTe DSL library
if [[ ! -f /tmp/site/.sparsecore-wheels && ! -d /tmp/site/nvidia_cutlass_dsl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.sparsecore-wheels || exit 1
fi
# sparsecore imports from the repository root (no install: the image's torch stays)
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1 MAX_JOBS=16 \
  FLASHINFER_WORKSPACE_BASE=$PWD/.flashinfer-cache
# benchmarks time one backend throughout: slow backends load in place, not behind another (sparsecore.warmup);
# firstcall sets its own
export SPARSECORE_WARMUP=${SPARSECORE_WARMUP:-wait}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    warm)
      for dtype in bfloat16 float16; do for dim in 128 64; do
        python3 bench/flashinfer_warmup.py $dtype $dim > "$OUT/warm-$dtype-$dim.log" 2>&1 &
      done; done ;;
    wait) wait; cat "$OUT"/warm-*.log | grep -E "warm:|Error" ;;
    fa4check) python3 bench/fa4_check.py --out "$OUT" 2>&1 | tail -60 ;;
    test)
      HYPOTHESIS_PROFILE=gpu python3 -P -m pytest -q -p no:cacheprovider -rfE --tb=short \
        tests/test_backends_match_oracle.py tests/test_large_masks.py tests/test_block_mass_triton.py \
        tests/test_nonfinite_isolation.py tests/test_unselected_match_oracle.py \
        -k "${TEST_FILTER:-cuda and not emulated}" > "$OUT/gpu-tests.log" 2>&1; tail -30 "$OUT/gpu-tests.log" ;;
    ringslices) python3 bench/ring_slices.py 2>&1 | tail -4 ;;
    planning) python3 bench/planning_benchmark.py --device cuda --out "$OUT" 2>&1 | tail -25 ;;
    searchstep) python3 bench/search_step.py --out "$OUT" 2>&1 | tail -30 ;;
    bench) python3 bench/cuda_benchmark.py --out "$OUT" --frames --adaspa ${BENCH_FLAGS:-} 2>&1 | grep -v "^  " ;;
    selection) python3 bench/cuda_benchmark.py --out "$OUT" --sizes --no-flashinfer --selection 2>&1 | tail -32 ;;
    approximation) python3 bench/approximation_benchmark.py --out "$OUT" 2>&1 | tail -20 ;;
    occupancy) python3 bench/fa4_occupancy_probe.py --out "$OUT" 2>&1 | grep '^|' ;;
    shortrows) python3 bench/short_rows_probe.py --out "$OUT" 2>&1 | grep '^|' ;;
    tailprobe) python3 bench/tail_probe.py --out "$OUT" 2>&1 | grep '^|' ;;
    variants) python3 bench/fa4_variant_probe.py --out "$OUT" --set "${VARIANT_SET:-persistent}" 2>&1 \
                | grep -E '^\{|Error' ;;
    keysplit) python3 bench/key_split_probe.py --out "$OUT" --backends fa4,triton 2>&1 | grep '^|' ;;
    e2e) python3 bench/e2e_benchmark.py --out "$OUT" ${E2E_FLAGS:-} ;;
    held) python3 bench/held_memory.py --out "$OUT" ${HELD_FLAGS:-} 2>&1 | tail -60 ;;
    firstcall) python3 bench/first_call_probe.py --out "$OUT" ${FIRST_CALL_FLAGS:-} 2>&1 | grep -E '^\| [a-z]|^imports' ;;
    memory) for method in pasa adaspa dense; do python3 bench/memory_profile.py --method $method --out "$OUT"; done ;;
    multigpu)
      # NVLink multicast stays off on shared hosts (shared/device KINDS.md)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
      (( gpus > 1 )) || { echo "multigpu: needs two GPUs or more, found $gpus"; continue; }
      # Ulysses where the GPU count divides the heads, else ring 2 x Ulysses N/2 (12 heads on 8 GPUs)
      mode_for() { (( $1 % gpus == 0 )) && echo "--mode ulysses" || echo "--mode unified --ring-degree 2"; }
      for run in "wan-1.3b 12 lvsa" "wan-14b 40 lvsa --layers ${LAYERS_14B:-10}" "wan-1.3b 12 adaspa" \
                 "wan-1.3b 12 dense"; do
        read -r model heads method extra <<< "$run"
        python3 bench/multigpu_benchmark.py --model $model --method $method --out "$OUT/multigpu" $extra 2>&1 \
          | grep -v '^{'
        python3 -m torch.distributed.run --nproc_per_node "$gpus" bench/multigpu_benchmark.py --model $model \
          --method $method $(mode_for $heads) --out "$OUT/multigpu" $extra 2>&1 | grep -v '^{'
      done
      for method in lvsa adaspa dense; do                                 # the ring alone, for comparison
        python3 -m torch.distributed.run --nproc_per_node "$gpus" bench/multigpu_benchmark.py --model wan-1.3b \
          --method $method --mode ring --out "$OUT/multigpu" 2>&1 | grep -v '^{'
      done
      python3 bench/multigpu_benchmark.py --report "$OUT/multigpu" ;;
    pack) [[ "$OUT" != bench/results ]] || { echo "pack: set OUT (the device tool's \$OUT), not bench/results"; exit 2; }
          tar czf /tmp/results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/results.tgz "$OUT/" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
