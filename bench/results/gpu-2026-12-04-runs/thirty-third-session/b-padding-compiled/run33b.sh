#!/usr/bin/env bash
# Thirty-third session, call b: the padding probe again, fa4's two paddings alternating before Triton's long calls
# (call a timed fa4's padding blocks right after Triton's 145 ms one-block calls); hv15-t2v 2x compiled, default
# against Triton; hv15 2x eager default (its 1,305 text tokens are joint-64 again: fa4).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
timeout 200 python3 bench/padding_probe.py --out $OUT/run > $OUT/run/padding-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; grep "^|" $OUT/run/padding-probe.log
for backend in default triton; do
  left=$(( 480 - ($(date +%s) - start) ))
  [ $left -gt 80 ] || { echo "skip compiled $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  timeout $left python3 bench/e2e_benchmark.py --models hv15-t2v --lengths 2x --modes compiled --methods adaspa \
    $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-hv15-t2v-compiled-adaspa-$backend \
    > $OUT/run/e2e-hv15-t2v-compiled-adaspa-$backend.log 2>&1
  echo "hv15-t2v compiled $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*hv15-t2v-compiled-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6,8,13,14 | cut -c1-260
done
left=$(( 580 - ($(date +%s) - start) ))
if [ $left -gt 70 ]; then
  timeout $left python3 bench/e2e_benchmark.py --models hv15 --lengths 2x --modes eager --methods adaspa \
    --budget-s $(( left - 20 )) --out $OUT/run --tag=-hv15-eager-adaspa-default > $OUT/run/e2e-hv15-eager-adaspa-default.log 2>&1
  echo "hv15 eager default rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*hv15-eager-adaspa-default.md 2>/dev/null | cut -d'|' -f5,6,8,13,14 | cut -c1-260
fi
cd $OUT && tar czf run.tgz run && rm -rf run
