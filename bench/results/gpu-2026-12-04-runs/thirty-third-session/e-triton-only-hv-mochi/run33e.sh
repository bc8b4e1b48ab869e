#!/usr/bin/env bash
# Thirty-third session, call e: HunyuanVideo 1.0 (1x, 720p) and Mochi (1x) with a 40-token prompt in their 256 text
# slots (216 padding), on a GPU without fa4 (no FA4 staged: Triton, dense steps on cuDNN): AdaSpa eager, the code
# before this session (1c6f887 with this session's e2e scripts) against now, in one call.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-nofa4 \
  .whl/diffusers-*.whl .whl/importlib_metadata-*.whl || exit 3
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
mkdir -p $OUT/run
start=$(date +%s)
for model in hv mochi; do
  for tree in now before; do
    left=$(( 560 - ($(date +%s) - start) ))
    [ $left -gt 80 ] || { echo "skip $model $tree: time"; continue; }
    root=$PWD; [ $tree = now ] || root=$PWD/.fa4/old
    (cd $root && PYTHONPATH=/tmp/site-nofa4:$root timeout $left python3 bench/e2e_benchmark.py --models $model \
      --modes eager --methods adaspa --backend triton --prompt-tokens 40 --budget-s $(( left - 20 )) --out $OUT/run \
      --tag=-$model-prompt40-eager-adaspa-triton-$tree) > $OUT/run/e2e-$model-prompt40-triton-$tree.log 2>&1
    echo "$model $tree rc=$? at $(( $(date +%s) - start )) s"
    grep -h "| adaspa" $OUT/run/e2e-*$model-prompt40-eager-adaspa-triton-$tree.md 2>/dev/null | cut -d'|' -f2,5,6,8 | cut -c1-240
  done
done
cd $OUT && tar czf run.tgz run && rm -rf run
