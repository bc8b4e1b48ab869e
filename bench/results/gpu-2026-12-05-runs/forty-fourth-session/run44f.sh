#!/usr/bin/env bash
# Forty-fourth session, call f (no FA4): portable's chunk uploads queued from pinned memory. The portable span and
# compile tests with CUDA, then the new sync test against the lowering before the change (lowering_before.py.txt, a
# copy of 4d8f2f8's; it must fail there: the fail-before check).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_portable_spans.py tests/test_compile_api.py -rfE \
  > $R/portable-after.log 2>&1; echo "after rc=$?"; tail -3 $R/portable-after.log
F=bench/results/gpu-2026-12-05-runs/forty-fourth-session/f
cp backends/portable/lowering.py /tmp/lowering_after.py && cp $F/lowering_before.py.txt backends/portable/lowering.py
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_portable_spans.py -k waits_for_it_once -rfE \
  > $R/portable-before.log 2>&1; echo "before (must fail) rc=$?"; grep -m3 "assert\|waits" $R/portable-before.log | cut -c1-300
cp /tmp/lowering_after.py backends/portable/lowering.py
cd $OUT && tar czf run.tgz run && rm -rf run
