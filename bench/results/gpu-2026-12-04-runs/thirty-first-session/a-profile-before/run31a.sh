#!/usr/bin/env bash
# Thirty-first session, call a: where CogVideoX 1.5's AdaSpa reuse step goes on fa4 and Triton, side by side in one
# process (bench/reuse_step_profile.py: wall, GPU busy/idle, host waits, kernels, a host profile).
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
(cd bench && timeout 480 python3 reuse_step_profile.py --out $OUT/run --model cogvideox-1.5 --length 2x \
  --backends fa4 triton fa4 triton --repeats 3) > $OUT/run/profile-cogvideox.log 2>&1
echo "cogvideox rc=$? at $(( $(date +%s) - start )) s"
grep -E "^(fa4|triton):" $OUT/run/profile-cogvideox.log
cd $OUT && tar czf run.tgz run && rm -rf run
