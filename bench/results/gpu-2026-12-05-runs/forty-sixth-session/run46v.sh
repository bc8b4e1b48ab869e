#!/usr/bin/env bash
# Forty-sixth session, call v (no FA4, about a minute): the readers' GPU test as rewritten after the review (the
# allocator's choice checked while the read is still queued), then the same test with the uploads memo retiring
# nothing (readers_before.py: must fail), then the statistics test with its mended bound.
set -u
export PYTHONPATH=$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait \
  HYPOTHESIS_PROFILE=gpu-quick
D46=bench/results/gpu-2026-12-05-runs/forty-sixth-session
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_stream_readers.py -rfE > $R/readers.log 2>&1
echo "readers rc=$?"; tail -2 $R/readers.log
timeout 30 python3 $D46/readers_before.py > $R/readers-before.log 2>&1; echo "readers before rc=$?"
tail -2 $R/readers-before.log
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_approximation_triton.py -k statistics -rfE \
  > $R/statistics.log 2>&1; echo "statistics rc=$?"; tail -2 $R/statistics.log
cd $OUT && tar czf run.tgz run && rm -rf run
