#!/usr/bin/env bash
# Twenty-sixth session, third call (run inline): NABLA's model part again, its masks no longer kept during timing.
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
timeout 500 python3 bench/nabla_benchmark.py --out $OUT/run --frames 61 --part model > $OUT/run/nabla-model.log 2>&1
