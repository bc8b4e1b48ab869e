#!/usr/bin/env bash
# Twenty-fourth session, call 6 (warm machine): Cosmos 2x compiled (regional: each block), then 1x eager.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 300 python3 bench/e2e_benchmark.py --models cosmos --lengths 2x --modes compiled --budget-s 270 \
  --out $OUT/run --tag=-cosmos-compiled > $OUT/run/e2e-cosmos-compiled.log 2>&1
tail -8 $OUT/run/e2e-cosmos-compiled.log
timeout 170 python3 bench/e2e_benchmark.py --models cosmos --lengths 1x --modes eager --budget-s 150 \
  --out $OUT/run --tag=-cosmos-1x > $OUT/run/e2e-cosmos-1x-eager.log 2>&1
tail -8 $OUT/run/e2e-cosmos-1x-eager.log
