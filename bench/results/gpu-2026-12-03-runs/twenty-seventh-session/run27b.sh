#!/usr/bin/env bash
# Twenty-seventh session, call 4: Wan 2.1 1.3B at 6x length with STA, compiled.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 560 python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 6x --modes compiled --methods sta \
  --budget-s 530 --out $OUT/run --tag=-sta-6x-compiled > $OUT/run/e2e-sta-6x-compiled.log 2>&1
echo "e2e 6x rc=$? at $(( $(date +%s) - start )) s"; tail -8 $OUT/run/e2e-sta-6x-compiled.log
