#!/usr/bin/env bash
# Forty-second session, call b (no FA4; carry .whl): the forty-first session's run41b.sh (never run: no machine came)
# plus the portable lowering's property cases on CUDA (this session's spans: consecutive query blocks with the same
# key blocks found on the device). First correctness: the GPU tests of the forty-first session's CUDA-touching changes
# (torch's cuDNN verdict in the dense pass, the block-mass refusal, the approximation pass's selected group term
# compiled for real), then the grouped pass's time at 6x beside drop-only (the select must not slow it).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt; cat $R/gpu.txt
start=$(date +%s)
left() { echo $(( 300 - ($(date +%s) - start) )); }
step() {  # step NAME CAP COMMAND...: run with min(CAP, time left), log to $R/NAME.log
  local name=$1 cap=$2; shift 2; local l; l=$(left); (( l < cap )) && cap=$l
  if (( cap < 30 )); then echo "$name: not run, $l s left"; return; fi
  timeout $cap "$@" > $R/$name.log 2>&1; echo "$name rc=$? at $(( $(date +%s) - start )) s"
  grep -v "UserWarning\|exe_args\|warnings.warn" $R/$name.log | tail -14 | cut -c1-220
}
step gpu-tests 130 python3 -P -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_dense_attention.py \
  tests/test_block_mass_triton.py tests/test_approximation_triton.py tests/test_unselected_match_oracle.py \
  -k "(gpu or cuda or approximation_triton) and not emulated and (not unselected_match or whole_group)"
step portable-cuda 60 python3 -P -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_backends_match_oracle.py \
  tests/test_portable_spans.py -k "portable-cuda or spans"
step approximation 120 python3 bench/approximation_benchmark.py --out $R --sizes 188760 --no-check
cd $OUT && tar czf run.tgz run && rm -rf run
