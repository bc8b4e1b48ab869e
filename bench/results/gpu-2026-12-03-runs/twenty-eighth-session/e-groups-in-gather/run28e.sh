#!/usr/bin/env bash
# Twenty-eighth session: strategies run per window, heads sorted in the order's gather (HeadGroupKernel.attend):
# the probe, then the search bench again.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 200 python3 bench/sta_strategy_probe.py --out $OUT/run > $OUT/run/sta-strategy-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; tail -2 $OUT/run/sta-strategy-probe.log
left=$(( 540 - ($(date +%s) - start) ))
timeout $left python3 bench/sta_search_benchmark.py --out $OUT/run > $OUT/run/sta-search.log 2>&1
echo "search bench rc=$? at $(( $(date +%s) - start )) s"; tail -5 $OUT/run/sta-search.log
