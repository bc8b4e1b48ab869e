#!/usr/bin/env bash
# Thirty-fifth session, call f: the README's headline row re-run on today's code: Wan 2.1 1.3B at 6x (121 latent
# frames, 188,760 tokens), compiled on both sides, LVSA, AdaSpa and PASA at their defaults on the default backends.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
tag=wan-6x-compiled-headline
timeout 585 python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 6x --modes compiled --methods lvsa adaspa pasa \
  --budget-s 560 --out $OUT/run --tag=-$tag > $OUT/run/e2e-$tag.log 2>&1
echo "$tag rc=$? at $(( $(date +%s) - start )) s"
grep -h "| lvsa\|| pasa\|| adaspa\|| dense " $OUT/run/e2e-*$tag.md 2>/dev/null | cut -d'|' -f5,6,7,8,9,12,13,14 | cut -c1-300
tail -3 $OUT/run/e2e-$tag.log | cut -c1-300
cd $OUT && tar czf run.tgz run && rm -rf run
