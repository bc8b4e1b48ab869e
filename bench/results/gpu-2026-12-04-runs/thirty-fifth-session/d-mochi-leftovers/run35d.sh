#!/usr/bin/env bash
# Thirty-fifth session, call d: what the thirty-fourth session left untimed on Mochi 1x (163 frames, 40-token prompt,
# classifier-free guidance's batch of two): AdaSpa compiled on Triton with the padded warm-up (each block's
# compile(fullgraph=True) on both sides; call c ran the default backend, fa4), and AdaSpa eager on the default backend
# with a negative prompt of T5's end token only (1 valid token: the pipeline does not zero it).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
run() {  # tag, then e2e_benchmark arguments
  local tag=$1; shift
  local left=$(( 580 - ($(date +%s) - start) ))
  [ $left -gt 90 ] || { echo "skip $tag: time"; return; }
  timeout $left python3 bench/e2e_benchmark.py --models mochi --lengths 1x --prompt-tokens 40 \
    --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag "$@" > $OUT/run/e2e-$tag.log 2>&1
  echo "$tag rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| pasa\|| lvsa\|| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
}
run mochi-prompt40-cfg-compiled-adaspa-triton --negative-tokens 0 --modes compiled --methods adaspa --backend triton
run mochi-prompt40-neg1-eager-adaspa-default --negative-tokens 1 --modes eager --methods adaspa
cd $OUT && tar czf run.tgz run && rm -rf run
