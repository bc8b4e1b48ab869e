#!/usr/bin/env bash
# Thirty-second session, call a (after FA4's staging call): the session's fa4 conversion changes on the GPU (a key
# order tried only where the tiles it can change may pay for it; a held mask's copy converts without a host read),
# then CogVideoX 1.5's AdaSpa reuse step on fa4 and Triton side by side (also the first timing of 78ed06e's Triton
# tile schedule) and Wan 2.1 1.3B's at 2x.
set -u
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fa4_tile_lists.py tests/test_fa4_layout.py \
  tests/test_block_mask_device.py tests/test_integration_gaps.py tests/test_backends_match_oracle.py \
  -k "fa4 or tile_lists or held or copy or geometry or reads or share" > $OUT/run/gpu-tests.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests.log | cut -c1-300
(cd bench && timeout 230 python3 step_profile.py --out $OUT/run --model cogvideox-1.5 --length 2x --methods adaspa \
  --backends fa4 triton fa4 triton --repeats 3) > $OUT/run/profile-cogvideox.log 2>&1
echo "cogvideox rc=$? at $(( $(date +%s) - start )) s"
grep -E "^adaspa " $OUT/run/profile-cogvideox.log
left=$(( 565 - ($(date +%s) - start) ))
(cd bench && timeout $left python3 step_profile.py --out $OUT/run --model wan-1.3b --length 2x --methods adaspa \
  --backends fa4 triton --repeats 3) > $OUT/run/profile-wan.log 2>&1
echo "wan rc=$? at $(( $(date +%s) - start )) s"
grep -E "^adaspa " $OUT/run/profile-wan.log
cd $OUT && tar czf run.tgz run && rm -rf run
