#!/usr/bin/env bash
# Thirty-first session, call e (no FA4): the session's change on CUDA (TRITON_INTERPRET=0, HYPOTHESIS gpu-quick): the
# mask tests, the held-mask count on real GPU copies, the diffusers integration's held/store/reuse tests, the audit.
set -u
export TRITON_INTERPRET=0 HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
timeout 270 python3 -m pytest -q -p no:cacheprovider -rs tests/test_block_mask_device.py tests/test_integration_gaps.py \
  tests/test_integration_audit.py \
  tests/test_integration_diffusers.py::test_adaspa_masks_kept_in_host_memory_leave_no_lists_on_the_device \
  tests/test_integration_diffusers.py::test_reuse_steps_launch_the_kernel_prepared_at_the_search \
  > $OUT/run/gpu-tests.log 2>&1
echo "tests rc=$?"; tail -5 $OUT/run/gpu-tests.log
cd $OUT && tar czf run.tgz run && rm -rf run
