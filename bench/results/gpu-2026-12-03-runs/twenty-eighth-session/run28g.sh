#!/usr/bin/env bash
# Twenty-eighth session, after the review: the search's candidates as one-head kernels over the heads folded into
# the batch, strategies' outputs written head-major without a concatenation: the probe and the search bench again.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 90 python3 bench/sta_strategy_probe.py --out $OUT/run > $OUT/run/sta-strategy-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; tail -1 $OUT/run/sta-strategy-probe.log
timeout $(( 250 - ($(date +%s) - start) )) python3 bench/sta_search_benchmark.py --out $OUT/run > $OUT/run/sta-search.log 2>&1
echo "search bench rc=$? at $(( $(date +%s) - start )) s"; tail -4 $OUT/run/sta-search.log
