#!/usr/bin/env bash
# Thirty-fourth session, call e: text-length groups as views (699c18a) against gathers (the code before it, with this
# commit's bench/step_profile.py) on Mochi's classifier-free guidance batch at 1x (40-token prompt, negative prompt
# zeroed), fa4 (default) and Triton alternating in each; the GPU tests of text_groups; then the e2e rows again.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run/before $OUT/run/now
start=$(date +%s)
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_text_groups.py -rs > $OUT/run/gpu-tests.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -2 $OUT/run/gpu-tests.log
for tree in before now; do
  root=$PWD; [ $tree = now ] || root=$PWD/.fa4/old
  (cd $root && PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$root timeout 200 python3 \
    bench/step_profile.py --model mochi --length 1x --prompt-tokens 40 --negative-tokens 0 \
    --backends default triton --out $OUT/run/$tree) > $OUT/run/$tree/step-profile.log 2>&1
  echo "$tree rc=$? at $(( $(date +%s) - start )) s"; grep "^adaspa" $OUT/run/$tree/step-profile.log
done
for backend in default triton; do
  left=$(( 575 - ($(date +%s) - start) ))
  [ $left -gt 80 ] || { echo "skip e2e $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  tag=mochi-prompt40-cfg-eager-adaspa-$backend
  timeout $left python3 bench/e2e_benchmark.py --models mochi --lengths 1x --modes eager --methods adaspa \
    --prompt-tokens 40 --negative-tokens 0 $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-$tag \
    > $OUT/run/e2e-$tag.log 2>&1
  echo "e2e $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,8,9,14 | cut -c1-260
done
cd $OUT && tar czf run.tgz run && rm -rf run
