#!/usr/bin/env bash
# Twenty-fifth session, call 3 (warm machine, FA4 staged): after the fa4 lowering writes head-major output: Cosmos 2x again, eager and compiled, with the
# inputs its Predict2.5 pipeline passes (a timestep per latent frame, a condition mask of zeros: 17 input channels).
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 190 python3 bench/e2e_benchmark.py --models cosmos --lengths 2x --modes eager --budget-s 170 \
  --out $OUT/run --tag=-cosmos-headmajor > $OUT/run/e2e-cosmos-headmajor-eager.log 2>&1
tail -7 $OUT/run/e2e-cosmos-headmajor-eager.log
timeout 220 python3 bench/e2e_benchmark.py --models cosmos --lengths 2x --modes compiled --budget-s 200 \
  --out $OUT/run --tag=-cosmos-headmajor-compiled > $OUT/run/e2e-cosmos-headmajor-compiled.log 2>&1
tail -7 $OUT/run/e2e-cosmos-headmajor-compiled.log
