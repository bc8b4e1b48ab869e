#!/usr/bin/env bash
# Twenty-ninth session, call 2 (after FA4's two stages): the fa4 conversion's Triton classification. The
# conversion probe (the previous fa4_layout.py as baseline, joint masks' per-call kernels), then the GPU tests of
# the conversion and of fa4 against the float64 oracle.
set -u
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
timeout 240 python3 bench/fa4_conversion_probe.py --out $OUT/run --baseline .fa4/2/old_fa4_layout.py --kernels \
  > $OUT/run/fa4-conversion-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; grep -v "^ \|^-\|^Name\|^Self\|USDT\|STAGE" $OUT/run/fa4-conversion-probe.log | tail -16 | cut -c1-200
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_fa4_tile_lists.py tests/test_fa4_layout.py \
  tests/test_backends_match_oracle.py -k "fa4 or tile_lists" > $OUT/run/gpu-tests-fa4.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -4 $OUT/run/gpu-tests-fa4.log | cut -c1-300
