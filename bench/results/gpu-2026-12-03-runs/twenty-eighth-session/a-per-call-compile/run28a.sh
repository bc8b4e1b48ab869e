#!/usr/bin/env bash
# Twenty-eighth session, first call: STA's window search on the H200 (bench/sta_search_benchmark.py), then the
# refactored STA bench on one case (its code last ran before the twenty-seventh session's refactor).
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 400 python3 bench/sta_search_benchmark.py --out $OUT/run > $OUT/run/sta-search.log 2>&1
echo "search bench rc=$? at $(( $(date +%s) - start )) s"; tail -12 $OUT/run/sta-search.log
left=$(( 540 - ($(date +%s) - start) ))
timeout $left python3 bench/sta_benchmark.py --out $OUT/run --st-attn .fa4/2/st_attn_triton.py \
  --cases "wan-1.3b 1x 480x832, window 3x3x3" > $OUT/run/sta-bench.log 2>&1
echo "sta bench rc=$? at $(( $(date +%s) - start )) s"; tail -12 $OUT/run/sta-bench.log
