#!/usr/bin/env bash
# Twenty-sixth session: what an fa4 call holds (PASA's extra partial output), then NABLA's model part with peaks
# reset at each row's start.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
timeout 200 python3 bench/fa4_memory_probe.py --out $OUT/run > $OUT/run/fa4-memory-probe.log 2>&1
echo "probe rc=$?"; grep -v Warn $OUT/run/fa4-memory-probe.log | tail -8 | cut -c1-600
timeout 300 python3 bench/nabla_benchmark.py --out $OUT/run --frames 61 --part model > $OUT/run/nabla-model.log 2>&1
echo "nabla rc=$?"; tail -9 $OUT/run/nabla-model.log
