#!/usr/bin/env bash
# Forty-third session, call f, for an H200 only (FA4 staged: fa4-stage.sh 1, then this with .fa4/2 and .whl): issue
# 13's table whole (bench/fa4_check.py: the 19 checks, then cuDNN dense, FA4 dense, FA4's own block-sparse call and
# the default at 32K/98K x 0.1/0.25/0.5, LVSA's frames and the AdaSpa shape at 6x). Exits at once on another GPU.
# Capped at 290 s (what the session's device time allows).
set -u
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { nvidia-smi --query-gpu=name --format=csv,noheader; exit 4; }
bash .fa4/2/fa4-stage.sh 2 || exit 3
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; cat $R/gpu.txt
start=$(date +%s)
left() { echo $(( 290 - ($(date +%s) - start) )); }
step() {  # step NAME CAP COMMAND...: run with min(CAP, time left), log to $R/NAME.log
  local name=$1 cap=$2; shift 2; local l; l=$(left); (( l < cap )) && cap=$l
  if (( cap < 30 )); then echo "$name: not run, $l s left"; return; fi
  timeout $cap "$@" > $R/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - start )) s"
  grep -v "UserWarning\|exe_args\|warnings.warn" $R/$name.log | tail -40 | cut -c1-220
}
step fa4-check 290 python3 bench/fa4_check.py --out $R
cd $OUT && tar czf run.tgz run && rm -rf run
