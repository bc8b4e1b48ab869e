#!/usr/bin/env bash
# Twenty-seventh session, call 2: STA kernels (sparsecore vs FastVideo's Triton kernel, FlexAttention, cuDNN), then
# Wan 2.1 1.3B 1x eager with STA as time allows.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/run/gpu.txt
start=$(date +%s)
timeout 360 python3 bench/sta_benchmark.py --st-attn .fa4/2/st_attn_triton.py --out $OUT/run \
  > $OUT/run/sta-kernels.log 2>&1
echo "kernels rc=$? in $(( $(date +%s) - start )) s"; tail -40 $OUT/run/sta-kernels.log | cut -c1-500
left=$(( 540 - ($(date +%s) - start) ))
timeout $left python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 1x --modes eager compiled --methods sta \
  --budget-s $(( left - 30 )) --out $OUT/run --tag=-sta-1x > $OUT/run/e2e-sta-1x.log 2>&1
echo "e2e 1x rc=$? at $(( $(date +%s) - start )) s"; tail -8 $OUT/run/e2e-sta-1x.log
