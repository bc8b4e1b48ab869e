#!/usr/bin/env bash
# Thirty-fourth session, call d: where Mochi's classifier-free guidance batch (two samples of different valid text:
# 40 and 0 tokens) spends the 12% its AdaSpa reuse step takes beyond twice batch 1's: bench/step_profile.py on the
# batch of two and on batch 1, fa4 (default) and Triton alternating.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run/cfg $OUT/run/one
start=$(date +%s)
timeout 280 python3 bench/step_profile.py --model mochi --length 1x --prompt-tokens 40 --negative-tokens 0 \
  --backends default triton --out $OUT/run/cfg > $OUT/run/cfg/step-profile.log 2>&1
echo "cfg rc=$? at $(( $(date +%s) - start )) s"; grep "^adaspa" $OUT/run/cfg/step-profile.log
timeout $(( 570 - ($(date +%s) - start) )) python3 bench/step_profile.py --model mochi --length 1x --prompt-tokens 40 \
  --backends default triton --out $OUT/run/one > $OUT/run/one/step-profile.log 2>&1
echo "one rc=$? at $(( $(date +%s) - start )) s"; grep "^adaspa" $OUT/run/one/step-profile.log
cd $OUT && tar czf run.tgz run && rm -rf run
