#!/usr/bin/env bash
# Thirty-fifth session, call c: what the thirty-fourth session left untimed on Mochi 1x (163 frames, 40-token prompt,
# classifier-free guidance's batch of two, the negative prompt zeroed: 0 valid tokens): PASA and LVSA eager on the
# default backend, then AdaSpa compiled on the default backend (fa4) with the padded warm-up (each block's
# compile(fullgraph=True) on both sides).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
run() {  # tag, then e2e_benchmark arguments
  local tag=$1; shift
  local left=$(( 580 - ($(date +%s) - start) ))
  [ $left -gt 90 ] || { echo "skip $tag: time"; return; }
  timeout $left python3 bench/e2e_benchmark.py --models mochi --lengths 1x --prompt-tokens 40 --negative-tokens 0 \
    --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag "$@" > $OUT/run/e2e-$tag.log 2>&1
  echo "$tag rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| pasa\|| lvsa\|| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
}
run mochi-prompt40-cfg-eager-pasa-lvsa-default --modes eager --methods pasa lvsa
run mochi-prompt40-cfg-compiled-adaspa-default --modes compiled --methods adaspa
cd $OUT && tar czf run.tgz run && rm -rf run
