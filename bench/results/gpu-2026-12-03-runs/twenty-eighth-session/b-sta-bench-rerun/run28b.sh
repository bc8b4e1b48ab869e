#!/usr/bin/env bash
# Twenty-eighth session, second call: where a per-head STA strategy's step goes (bench/sta_strategy_probe.py), then
# the STA bench's short-tile case with the cache fix.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 240 python3 bench/sta_strategy_probe.py --out $OUT/run > $OUT/run/sta-strategy-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; tail -9 $OUT/run/sta-strategy-probe.log
left=$(( 500 - ($(date +%s) - start) ))
timeout $left python3 bench/sta_benchmark.py --out $OUT/run --st-attn .fa4/2/st_attn_triton.py \
  --cases "wan-1.3b 1x 480x832, window 3x3x3" > $OUT/run/sta-bench.log 2>&1
echo "sta bench rc=$? at $(( $(date +%s) - start )) s"; tail -12 $OUT/run/sta-bench.log
