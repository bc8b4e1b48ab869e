#!/usr/bin/env bash
# Thirty-fifth session, call e: where PASA's sparse step goes on Mochi 1x (40-token prompt): bench/step_profile.py on
# classifier-free guidance's batch of two (the negative prompt zeroed) and on batch 1, fa4 (default) and Triton
# alternating.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run/cfg $OUT/run/one
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
timeout 280 python3 bench/step_profile.py --model mochi --length 1x --methods pasa --prompt-tokens 40 \
  --negative-tokens 0 --backends default triton --out $OUT/run/cfg > $OUT/run/cfg/step-profile.log 2>&1
echo "cfg rc=$? at $(( $(date +%s) - start )) s"; grep "^pasa" $OUT/run/cfg/step-profile.log
timeout $(( 570 - ($(date +%s) - start) )) python3 bench/step_profile.py --model mochi --length 1x --methods pasa \
  --prompt-tokens 40 --backends default triton --out $OUT/run/one > $OUT/run/one/step-profile.log 2>&1
echo "one rc=$? at $(( $(date +%s) - start )) s"; grep "^pasa" $OUT/run/one/step-profile.log
cd $OUT && tar czf run.tgz run && rm -rf run
