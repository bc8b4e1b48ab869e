#!/usr/bin/env bash
# Forty-third session, call d (FA4 staged as for call c): where the fa4 lowering loses to FA4's own call at 98,304
# tokens d=0.1 on the H100 (bench/fa4_gap_probe.py: lists, output layout and entry point crossed). Cap 300 s.
set -u
test -d /tmp/site/nvidia_cutlass_dsl || bash .fa4/2/fa4-stage.sh 2 || exit 3
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; cat $R/gpu.txt
start=$(date +%s)
left() { echo $(( 300 - ($(date +%s) - start) )); }
step() {  # step NAME CAP COMMAND...: run with min(CAP, time left), log to $R/NAME.log
  local name=$1 cap=$2; shift 2; local l; l=$(left); (( l < cap )) && cap=$l
  if (( cap < 30 )); then echo "$name: not run, $l s left"; return; fi
  timeout $cap "$@" > $R/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - start )) s"
  grep -v "UserWarning\|exe_args\|warnings.warn" $R/$name.log | tail -30 | cut -c1-220
}
step gap 280 python3 bench/fa4_gap_probe.py --out $R
cd $OUT && tar czf run.tgz run && rm -rf run
