#!/usr/bin/env bash
# Thirty-first session, call d: SkyReels-V2 DF's frame-causal masks (64-token blocks and a 24-token one in every
# causal block) ran AdaSpa's reuse 45% and PASA's sparse step 53% slower on fa4 than on Triton (2026-12-03): after the
# held masks' count moved to the device, the repeating steps side by side (bench/step_profile.py), then e2e rows.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
(cd bench && timeout 300 python3 step_profile.py --out $OUT/run --model skyreels-df --length 2x \
  --methods adaspa pasa --backends fa4 triton --repeats 3) > $OUT/run/profile-skyreels.log 2>&1
echo "skyreels rc=$? at $(( $(date +%s) - start )) s"
grep -E "^(adaspa|pasa|lvsa) " $OUT/run/profile-skyreels.log
for backend in fa4 triton; do
  left=$(( 560 - ($(date +%s) - start) ))
  [ $left -gt 90 ] || { echo "skip e2e $backend: time"; continue; }
  timeout $left python3 bench/e2e_benchmark.py --models skyreels-df --lengths 2x --modes eager --methods adaspa \
    --backend $backend --budget-s $(( left - 20 )) --out $OUT/run --tag=-skyreels-df-adaspa-$backend \
    > $OUT/run/e2e-skyreels-df-adaspa-$backend.log 2>&1
  echo "skyreels-df $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*skyreels-df-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6 | cut -c1-200
done
cd $OUT && tar czf run.tgz run && rm -rf run
