#!/usr/bin/env bash
# Thirty-third session, call d: what the padding blocks do for a GPU without fa4 (an A100, L40S, RTX 4090 user: Triton
# only). No FA4 staged: hv15-t2v 2x eager AdaSpa on Triton, the code before this session (1c6f887: one padding
# block, and the second dense pass for the LSE) against now (e9bc00b), in one call.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-nofa4 \
  .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || exit 3
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
mkdir -p $OUT/run
start=$(date +%s)
for tree in now before; do
  left=$(( 560 - ($(date +%s) - start) ))
  [ $left -gt 80 ] || { echo "skip $tree: time"; continue; }
  root=$PWD; [ $tree = now ] || root=$PWD/.fa4/old
  (cd $root && PYTHONPATH=/tmp/site-nofa4:$root timeout $left python3 bench/e2e_benchmark.py --models hv15-t2v --lengths 2x \
    --modes eager --methods adaspa --backend triton --budget-s $(( left - 20 )) --out $OUT/run \
    --tag=-hv15-t2v-eager-adaspa-triton-$tree) > $OUT/run/e2e-hv15-t2v-eager-adaspa-triton-$tree.log 2>&1
  echo "$tree rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*triton-$tree.md 2>/dev/null | cut -d'|' -f5,6,8,13,14 | cut -c1-260
done
cd $OUT && tar czf run.tgz run && rm -rf run
