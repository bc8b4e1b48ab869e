#!/usr/bin/env bash
# Twenty-eighth session: the strategy probe again (outputs compared by relative L2, not bit for bit).
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
timeout 300 python3 bench/sta_strategy_probe.py --out $OUT/run > $OUT/run/sta-strategy-probe.log 2>&1
echo "probe rc=$?"; tail -9 $OUT/run/sta-strategy-probe.log
