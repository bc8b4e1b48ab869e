#!/usr/bin/env bash
# Forty-third session, call e (no FA4, no wheels): the approximation pass's 64-block tiles (two words of the listed-
# block bits a tile). First the pass's GPU tile tests, compiled for real (test_triton_gpu_paths: 32-128 blocks a
# tile, 100 and 70 blocks; test_approximation_triton), then PASA's 6x mask through bench/approximation_benchmark.py
# with the tile sweep (128x32 against 128x64 and 64x64, zeroth and grouped kinds). Each step gets what is left of 420 s.
set -u
export PYTHONPATH=$PWD:$PWD/bench PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; cat $R/gpu.txt
start=$(date +%s)
left() { echo $(( 420 - ($(date +%s) - start) )); }
step() {  # step NAME CAP COMMAND...: run with min(CAP, time left), log to $R/NAME.log
  local name=$1 cap=$2; shift 2; local l; l=$(left); (( l < cap )) && cap=$l
  if (( cap < 30 )); then echo "$name: not run, $l s left"; return; fi
  timeout $cap "$@" > $R/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - start )) s"
  grep -v "UserWarning\|warnings.warn" $R/$name.log | tail -24 | cut -c1-220
}
step tiles-tests 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_triton_gpu_paths.py -k "approximation_tiles or test_approximation_triton" \
  tests/test_approximation_triton.py
step sweep 260 python3 bench/approximation_benchmark.py --out $R --sizes 188760 --no-check --sweep
cd $OUT && tar czf run.tgz run && rm -rf run
