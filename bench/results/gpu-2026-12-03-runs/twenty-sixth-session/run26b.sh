#!/usr/bin/env bash
# Twenty-sixth session: Radial Attention kernels (after the stub fix), then Wan 2.1 1.3B 6x compiled.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 300 python3 bench/radial_benchmark.py --attn-mask .fa4/2/radial_attn_mask.py --out $OUT/run \
  > $OUT/run/radial-kernels.log 2>&1
echo "kernels rc=$? in $(( $(date +%s) - start )) s"; grep -v "mask sparsity" $OUT/run/radial-kernels.log | tail -30 | cut -c1-400
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 6x --modes compiled --methods radial \
  --budget-s $(( left - 30 )) --out $OUT/run --tag=-radial-6x-compiled > $OUT/run/e2e-radial-6x-compiled.log 2>&1
echo "e2e 6x compiled rc=$? at $(( $(date +%s) - start )) s"; tail -6 $OUT/run/e2e-radial-6x-compiled.log
