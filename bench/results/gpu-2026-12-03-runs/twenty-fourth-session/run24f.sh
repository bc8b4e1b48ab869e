#!/usr/bin/env bash
# Twenty-fourth session, call 9 (after FA4's two stages, a third time): Cosmos 2x again, eager and compiled, with the
# inputs its Predict2.5 pipeline passes (a timestep per latent frame, a condition mask of zeros: 17 input channels).
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 190 python3 bench/e2e_benchmark.py --models cosmos --lengths 2x --modes eager --budget-s 170 \
  --out $OUT/run --tag=-cosmos-pipeline-inputs > $OUT/run/e2e-cosmos-pipeline-inputs-eager.log 2>&1
tail -7 $OUT/run/e2e-cosmos-pipeline-inputs-eager.log
timeout 220 python3 bench/e2e_benchmark.py --models cosmos --lengths 2x --modes compiled --budget-s 200 \
  --out $OUT/run --tag=-cosmos-pipeline-inputs-compiled > $OUT/run/e2e-cosmos-pipeline-inputs-compiled.log 2>&1
tail -7 $OUT/run/e2e-cosmos-pipeline-inputs-compiled.log
