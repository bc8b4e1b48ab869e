#!/usr/bin/env bash
# Forty-eighth session, call b (after `bash .fa4/1/fa4-stage.sh 1`; starts with stage 2): this session's mends on the
# GPU (selection by the device's shared memory, token-order copies, torch.compile scalars, FA4's dense
# warm-up of both LSE variants), then Radial Attention's
# kernels timed in interleaved rounds (bench/radial_benchmark.py: sparsecore, the released FlashInfer call, cuDNN).
set -u
start=$(date +%s)
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 \
  TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/b; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $R/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $R/gpu.txt; cat $R/gpu.txt
source bench/gpu_pytest.sh
t 150 mends tests/test_shared_memory.py tests/test_cuda_selection.py tests/test_stream_readers.py \
  tests/test_torch_compile_kernel.py tests/test_warmup.py tests/test_warmup_samples.py
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 bench/radial_benchmark.py --attn-mask .fa4/2/radial_attn_mask.py --out $R > $R/radial-kernels.log 2>&1
echo "radial rc=$? at $(( $(date +%s) - start )) s"; grep -v "mask sparsity" $R/radial-kernels.log | tail -12 | cut -c1-300
