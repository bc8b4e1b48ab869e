#!/usr/bin/env bash
# Twenty-sixth session: Radial Attention. Kernels (sparsecore vs the released FlashInfer path vs cuDNN dense) and
# Wan 2.1 1.3B whole steps with Radial's released Wan schedule (1x eager + compiled, 6x eager).
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
timeout 240 python3 bench/radial_benchmark.py --attn-mask .fa4/2/radial_attn_mask.py --out $OUT/run \
  > $OUT/run/radial-kernels.log 2>&1
echo "kernels rc=$? in $(( $(date +%s) - start )) s"; grep -v "mask sparsity" $OUT/run/radial-kernels.log | tail -30 | cut -c1-400
left=$(( 555 - ($(date +%s) - start) ))
timeout $left python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 1x --modes eager compiled --methods radial \
  --budget-s $(( left - 30 )) --out $OUT/run --tag=-radial-1x > $OUT/run/e2e-radial-1x.log 2>&1
echo "e2e 1x rc=$? at $(( $(date +%s) - start )) s"; tail -8 $OUT/run/e2e-radial-1x.log
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 6x --modes eager --methods radial \
  --budget-s $(( left - 30 )) --out $OUT/run --tag=-radial-6x > $OUT/run/e2e-radial-6x.log 2>&1
echo "e2e 6x rc=$? at $(( $(date +%s) - start )) s"; tail -6 $OUT/run/e2e-radial-6x.log
