#!/usr/bin/env bash
# Forty-fifth session, call t (no FA4): a kernel's calls on a second stream wait for the plan copies its first call
# queued on another (tests/test_stream_order.py with CUDA, then its GPU test with StreamOrder.ordered a no-op: the
# failure the test catches), the approximation's value means on CUDA (the overflow and 1e8 cases, the statistics), and
# the dense pass's cuDNN check asked on q under GQA (tests/test_dense_attention.py -k cudnn, the GPU oracle cases too).
set -u
export PYTHONPATH=$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait \
  HYPOTHESIS_PROFILE=gpu-quick
D=bench/results/gpu-2026-12-05-runs/forty-fifth-session
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_stream_order.py -rfE > $R/stream-order.log 2>&1
echo "stream-order rc=$?"; tail -3 $R/stream-order.log
timeout 100 python3 $D/stream_order_before.py > $R/stream-order-before.log 2>&1; echo "before rc=$?"
tail -4 $R/stream-order-before.log
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_unselected_match_oracle.py -k "overflow or 1e8" -rfE \
  > $R/unselected-cuda.log 2>&1; echo "unselected rc=$?"; tail -2 $R/unselected-cuda.log
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_approximation_triton.py tests/test_unselected_parts.py \
  -rfE > $R/approximation-triton.log 2>&1; echo "approximation rc=$?"; tail -2 $R/approximation-triton.log
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_dense_attention.py -k cudnn -rfE \
  > $R/dense-cudnn.log 2>&1; echo "dense rc=$?"; tail -2 $R/dense-cudnn.log
cd $OUT && tar czf run.tgz run && rm -rf run
