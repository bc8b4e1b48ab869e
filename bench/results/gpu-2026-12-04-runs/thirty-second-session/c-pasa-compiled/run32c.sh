#!/usr/bin/env bash
# Thirty-second session, call c: PASA's sparse step on Wan 2.1 1.3B at 2x, fa4 against Triton (its masks now note
# their row lengths: fa4 converts them without a host read); CogVideoX 1.5's AdaSpa steps compiled on the new
# default (fa4 for joint masks) and on Triton; then fa4 against the float64 oracle.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
(cd bench && timeout 150 python3 step_profile.py --out $OUT/run --model wan-1.3b --length 2x --methods pasa \
  --backends fa4 triton --repeats 3) > $OUT/run/profile-wan-pasa.log 2>&1
echo "wan pasa rc=$? at $(( $(date +%s) - start )) s"
grep -E "^pasa " $OUT/run/profile-wan-pasa.log
for backend in default triton; do
  left=$(( 420 - ($(date +%s) - start) ))
  [ $left -gt 80 ] || { echo "skip compiled $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  timeout $left python3 bench/e2e_benchmark.py --models cogvideox-1.5 --lengths 2x --modes compiled --methods adaspa \
    $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-cogvideox-1.5-compiled-adaspa-$backend \
    > $OUT/run/e2e-cogvideox-1.5-compiled-adaspa-$backend.log 2>&1
  echo "cogvideox compiled $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*cogvideox-1.5-compiled-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
done
left=$(( 572 - ($(date +%s) - start) ))
HYPOTHESIS_PROFILE=gpu-quick timeout $left python3 -m pytest -q -p no:cacheprovider -rs \
  tests/test_backends_match_oracle.py -k fa4 > $OUT/run/gpu-tests-oracle-fa4.log 2>&1
echo "oracle fa4 rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests-oracle-fa4.log | cut -c1-300
cd $OUT && tar czf run.tgz run && rm -rf run
