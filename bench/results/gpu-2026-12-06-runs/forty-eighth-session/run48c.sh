#!/usr/bin/env bash
# Forty-eighth session, call c (same warm machine as call b: FA4 staged in /tmp/site): STA's kernels (sparsecore,
# FastVideo's Triton kernel at 37cab18, FlexAttention, cuDNN) and NABLA's (plans, sparsecore, FlexAttention, cuDNN),
# every kernel of a shape timed together in interleaved rounds.
set -u
start=$(date +%s)
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 \
  TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait
R=$OUT/c; mkdir -p $R
timeout ${STA_S:-330} python3 bench/sta_benchmark.py --st-attn .fa4/2/st_attn_triton.py --out $R > $R/sta-kernels.log 2>&1
echo "sta rc=$? at $(( $(date +%s) - start )) s"; grep -v '^{' $R/sta-kernels.log | tail -10 | cut -c1-300
left=$(( ${CALL_S:-570} - ($(date +%s) - start) ))
[ $left -gt 60 ] || { echo "no time left for nabla"; exit 0; }
timeout $left python3 bench/nabla_benchmark.py --out $R --frames 61 --part kernels > $R/nabla-kernels.log 2>&1
echo "nabla rc=$? at $(( $(date +%s) - start )) s"; grep -v "Warning\|warn(" $R/nabla-kernels.log | tail -12 | cut -c1-300
