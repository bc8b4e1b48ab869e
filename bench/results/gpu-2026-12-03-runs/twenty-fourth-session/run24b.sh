#!/usr/bin/env bash
# Twenty-fourth session, call 3 (warm machine): Kandinsky 5 Lite end to end, 2x compiled (regional), then 1x eager and compiled.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 330 python3 bench/e2e_benchmark.py --models kandinsky5 --lengths 2x --modes compiled --budget-s 300 \
  --out $OUT/run --tag=-kandinsky5-compiled > $OUT/run/e2e-kandinsky5-compiled.log 2>&1
tail -8 $OUT/run/e2e-kandinsky5-compiled.log
timeout 230 python3 bench/e2e_benchmark.py --models kandinsky5 --lengths 1x --modes eager --budget-s 200 \
  --out $OUT/run --tag=-kandinsky5-1x > $OUT/run/e2e-kandinsky5-1x-eager.log 2>&1
tail -8 $OUT/run/e2e-kandinsky5-1x-eager.log
timeout 200 python3 bench/e2e_benchmark.py --models kandinsky5 --lengths 1x --modes compiled --budget-s 180 \
  --out $OUT/run --tag=-kandinsky5-1x-compiled > $OUT/run/e2e-kandinsky5-1x-compiled.log 2>&1
tail -8 $OUT/run/e2e-kandinsky5-1x-compiled.log
