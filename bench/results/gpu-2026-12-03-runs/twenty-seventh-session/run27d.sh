#!/usr/bin/env bash
# Twenty-seventh session, last call: HunyuanVideo at FastVideo's STA grid (117 frames, 768 x 1280; 3 of 60 layers,
# scaled) with FastVideo's shipped Hunyuan mask strategy, eager, then compiled as time allows.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
for mode in eager compiled; do
  left=$(( 550 - ($(date +%s) - start) ))
  timeout $left python3 bench/e2e_benchmark.py --models hv --lengths 768p --modes $mode --methods sta-file \
    --sta-strategy .fa4/2/mask_strategy_hunyuan.json --budget-s $(( left - 20 )) --out $OUT/run \
    --tag=-sta-hv-$mode > $OUT/run/e2e-sta-hv-$mode.log 2>&1
  echo "e2e hv $mode rc=$? at $(( $(date +%s) - start )) s"; tail -4 $OUT/run/e2e-sta-hv-$mode.log
done
