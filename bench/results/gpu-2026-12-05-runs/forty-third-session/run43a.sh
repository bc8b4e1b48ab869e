#!/usr/bin/env bash
# Forty-third session, call a (FA4 staged: fa4-stage.sh 1, then this with .fa4/2 and .whl): the forty-second session's
# run42a.sh, which never ran (issue 13's kernel table in one run: cuDNN dense, FA4 dense, FA4's own block-sparse call,
# the default; then the probes behind README's 6x figures: key_split_probe, fa4_occupancy_probe, ring_slices), and
# last the portable spans found a window of list entries at a time from lists on the GPU (int32 index_add_ and
# index_select there). Each step gets what is left of 560 s.
set -u
bash .fa4/2/fa4-stage.sh 2 || exit 3
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; cat $R/gpu.txt
start=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - start) )); }
step() {  # step NAME CAP COMMAND...: run with min(CAP, time left), log to $R/NAME.log
  local name=$1 cap=$2; shift 2; local l; l=$(left); (( l < cap )) && cap=$l
  if (( cap < 30 )); then echo "$name: not run, $l s left"; return; fi
  timeout $cap "$@" > $R/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - start )) s"
  grep -v "UserWarning\|exe_args\|warnings.warn" $R/$name.log | tail -14 | cut -c1-220
}
step fa4-check 200 python3 bench/fa4_check.py --out $R
step key-split 130 python3 bench/key_split_probe.py --out $R --backends triton,fa4
step occupancy 110 python3 bench/fa4_occupancy_probe.py --out $R
step ring-slices 60 python3 bench/ring_slices.py
step portable-spans 45 python3 -m pytest -q -p no:cacheprovider tests/test_portable_spans.py -rfE
cd $OUT && tar czf run.tgz run && rm -rf run
