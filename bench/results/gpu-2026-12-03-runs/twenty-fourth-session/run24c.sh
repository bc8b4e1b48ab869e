#!/usr/bin/env bash
# Twenty-fourth session, call 5 (after FA4's two stages again): Cosmos-Predict2.5 2B-shaped end to end, 2x, eager.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 380 python3 bench/e2e_benchmark.py --models cosmos --lengths 2x --modes eager --budget-s 350 \
  --out $OUT/run --tag=-cosmos > $OUT/run/e2e-cosmos-eager.log 2>&1
tail -8 $OUT/run/e2e-cosmos-eager.log
