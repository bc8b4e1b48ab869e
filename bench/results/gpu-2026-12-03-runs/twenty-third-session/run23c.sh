#!/usr/bin/env bash
# Twenty-third session, call 4 (warm machine): LTX-Video and LTX-2 end to end, compiled (regional), 2x.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 290 python3 bench/e2e_benchmark.py --models ltx --lengths 2x --modes compiled --budget-s 270 \
  --out $OUT/run --tag=-ltx > $OUT/run/e2e-ltx-compiled.log 2>&1
tail -4 $OUT/run/e2e-ltx-compiled.log
timeout 290 python3 bench/e2e_benchmark.py --models ltx2 --lengths 2x --modes compiled --budget-s 270 \
  --out $OUT/run --tag=-ltx2 > $OUT/run/e2e-ltx2-compiled.log 2>&1
tail -4 $OUT/run/e2e-ltx2-compiled.log
