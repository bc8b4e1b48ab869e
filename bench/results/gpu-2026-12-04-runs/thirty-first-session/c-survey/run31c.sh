#!/usr/bin/env bash
# Thirty-first session, call c: is any other method's repeating step waiting on the host? bench/step_profile.py on
# each method's default backends: Wan 2.1 1.3B at 2x (AdaSpa, PASA, LVSA), HunyuanVideo 1.5 at 2x (PASA, LVSA).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
(cd bench && timeout 330 python3 step_profile.py --out $OUT/run --model wan-1.3b --length 2x \
  --methods adaspa pasa lvsa --backends default --repeats 3) > $OUT/run/profile-wan.log 2>&1
echo "wan rc=$? at $(( $(date +%s) - start )) s"
grep -E "^(adaspa|pasa|lvsa) " $OUT/run/profile-wan.log
left=$(( 560 - ($(date +%s) - start) ))
(cd bench && timeout $left python3 step_profile.py --out $OUT/run --model hv15 --length 2x \
  --methods pasa lvsa --backends default --repeats 3) > $OUT/run/profile-hv15.log 2>&1
echo "hv15 rc=$? at $(( $(date +%s) - start )) s"
grep -E "^(adaspa|pasa|lvsa) " $OUT/run/profile-hv15.log
cd $OUT && tar czf run.tgz run && rm -rf run
