#!/usr/bin/env bash
# Twenty-eighth session, last call: a 50-step search generation on Wan 2.1 1.3B (random weights) writing its strategy,
# then whole generations with that strategy (e2e sta-file rows: 15 dense steps, then its windows), eager and compiled.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 200 python3 bench/sta_search_generation.py --out $OUT/run --strategy-out $OUT/run/searched-strategy.json \
  > $OUT/run/sta-search-generation.log 2>&1
echo "search generation rc=$? at $(( $(date +%s) - start )) s"; tail -2 $OUT/run/sta-search-generation.log
for mode in eager compiled; do
  left=$(( 470 - ($(date +%s) - start) ))
  timeout $left python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 1x --modes $mode --methods sta-file \
    --sta-strategy $OUT/run/searched-strategy.json --budget-s $(( left - 20 )) --out $OUT/run \
    --tag=-sta-searched-$mode > $OUT/run/e2e-sta-searched-$mode.log 2>&1
  echo "e2e $mode rc=$? at $(( $(date +%s) - start )) s"; tail -4 $OUT/run/e2e-sta-searched-$mode.log
done
