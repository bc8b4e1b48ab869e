#!/usr/bin/env bash
# Twenty-third session, call 3 (after FA4's two stages): LTX-Video and LTX-2 end to end, eager, 1x and 2x.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 270 python3 bench/e2e_benchmark.py --models ltx --modes eager --budget-s 250 \
  --out $OUT/run --tag=-ltx > $OUT/run/e2e-ltx-eager.log 2>&1
tail -4 $OUT/run/e2e-ltx-eager.log
timeout 270 python3 bench/e2e_benchmark.py --models ltx2 --modes eager --budget-s 250 \
  --out $OUT/run --tag=-ltx2 > $OUT/run/e2e-ltx2-eager.log 2>&1
tail -4 $OUT/run/e2e-ltx2-eager.log
