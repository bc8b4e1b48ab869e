#!/usr/bin/env bash
# Forty-sixth session, call t (no FA4; forty-fifth's run45t.sh, never run, and this session's stream readers): a
# kernel's calls on a second stream wait for the plan copies its first call queued on another (tests/test_stream_order.py
# with CUDA, then its GPU test with StreamOrder.ordered a no-op), an upload a memo drops keeps its memory until another
# stream's read ran (tests/test_stream_readers.py, then its GPU test with the memo retiring nothing), the approximation's
# value means on CUDA (the overflow and 1e8 cases, the statistics), and the dense pass's cuDNN check under GQA.
set -u
export PYTHONPATH=$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait \
  HYPOTHESIS_PROFILE=gpu-quick
D45=bench/results/gpu-2026-12-05-runs/forty-fifth-session D46=bench/results/gpu-2026-12-05-runs/forty-sixth-session
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_stream_order.py tests/test_stream_readers.py -rfE \
  > $R/streams.log 2>&1; echo "streams rc=$?"; tail -3 $R/streams.log
timeout 90 python3 $D45/stream_order_before.py > $R/stream-order-before.log 2>&1; echo "order before rc=$?"
tail -4 $R/stream-order-before.log
timeout 40 python3 $D46/readers_before.py > $R/readers-before.log 2>&1; echo "readers before rc=$?"
tail -2 $R/readers-before.log
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_unselected_match_oracle.py -k "overflow or 1e8" -rfE \
  > $R/unselected-cuda.log 2>&1; echo "unselected rc=$?"; tail -2 $R/unselected-cuda.log
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_approximation_triton.py tests/test_unselected_parts.py \
  -rfE > $R/approximation-triton.log 2>&1; echo "approximation rc=$?"; tail -2 $R/approximation-triton.log
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_dense_attention.py -k cudnn -rfE \
  > $R/dense-cudnn.log 2>&1; echo "dense rc=$?"; tail -2 $R/dense-cudnn.log
cd $OUT && tar czf run.tgz run && rm -rf run
