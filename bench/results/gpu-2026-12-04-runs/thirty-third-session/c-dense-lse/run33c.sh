#!/usr/bin/env bash
# Thirty-third session, call c: AdaSpa's dense+lse step with text padding now keeps its own dense pass's LSE
# (9272e37): hv15-t2v 2x eager and compiled on the default (fa4); then LVSA and PASA on hv15-t2v eager (their
# padded masks: LVSA's frames with padding blocks, PASA's approximating masks on the valid prefix).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
for mode in eager compiled; do
  left=$(( 400 - ($(date +%s) - start) ))
  [ $left -gt 80 ] || { echo "skip $mode: time"; continue; }
  timeout $left python3 bench/e2e_benchmark.py --models hv15-t2v --lengths 2x --modes $mode --methods adaspa \
    --budget-s $(( left - 20 )) --out $OUT/run --tag=-hv15-t2v-$mode-adaspa-lse > $OUT/run/e2e-hv15-t2v-$mode-adaspa-lse.log 2>&1
  echo "hv15-t2v $mode rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*hv15-t2v-$mode-adaspa-lse.md 2>/dev/null | cut -d'|' -f5,6,8,13,14 | cut -c1-260
done
left=$(( 570 - ($(date +%s) - start) ))
if [ $left -gt 80 ]; then
  timeout $left python3 bench/e2e_benchmark.py --models hv15-t2v --lengths 2x --modes eager --methods lvsa pasa \
    --budget-s $(( left - 20 )) --out $OUT/run --tag=-hv15-t2v-eager-lvsa-pasa > $OUT/run/e2e-hv15-t2v-eager-lvsa-pasa.log 2>&1
  echo "hv15-t2v lvsa pasa rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| lvsa\|| pasa" $OUT/run/e2e-*hv15-t2v-eager-lvsa-pasa.md 2>/dev/null | cut -d'|' -f5,6,8,13,14 | cut -c1-260
fi
cd $OUT && tar czf run.tgz run && rm -rf run
