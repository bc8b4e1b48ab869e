#!/usr/bin/env bash
# Twenty-third session, call 1 (no FA4 staged): the segmented kernel's tests on CUDA after the review's mends (each
# block of a 128-key tile summed apart), and one layer of four layouts against the previous code.
set -u
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick PYTHONPATH=$PWD PYTHONUNBUFFERED=1
sed 's/\.block_mass_kernel import/.block_mass_kernel_previous import/' scratch_prev/block_mass.py \
  > backends/cuda/block_mass_previous.py
cp scratch_prev/block_mass_kernel.py backends/cuda/block_mass_kernel_previous.py
mkdir -p $OUT/run
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_block_mass_segments.py tests/test_block_mass_triton.py \
  -W ignore -rs > $OUT/run/gpu-tests-mass-segments-mended.log 2>&1
tail -3 $OUT/run/gpu-tests-mass-segments-mended.log
timeout 300 python3 bench/mass_segments.py --previous sparsecore.backends.cuda.block_mass_previous --out $OUT/run \
  > $OUT/run/mass-segments-mended.log 2>&1
grep " ms " $OUT/run/mass-segments-mended.log || tail -5 $OUT/run/mass-segments-mended.log
