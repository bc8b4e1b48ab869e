#!/usr/bin/env bash
# Thirty-third session, call a: text padding cut into blocks like the mask's (BlockMask.with_padding) and the
# joint-64 class over HunyuanVideo 1.5's text slots. GPU tests of the padding on every CUDA target; the padding
# probe (AdaSpa's masks for HunyuanVideo 1.5 t2v at 2x, padded the old way and the new, fa4 and Triton); whole
# AdaSpa steps and generations of hv15-t2v 2x eager, default against Triton.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
start=$(date +%s)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_padding.py tests/test_cuda_selection.py -rs \
  > $OUT/run/gpu-tests-padding.log 2>&1
echo "tests rc=$? at $(( $(date +%s) - start )) s"; tail -3 $OUT/run/gpu-tests-padding.log
timeout 200 python3 bench/padding_probe.py --out $OUT/run > $OUT/run/padding-probe.log 2>&1
echo "probe rc=$? at $(( $(date +%s) - start )) s"; grep "^|" $OUT/run/padding-probe.log
for backend in default triton; do
  left=$(( 570 - ($(date +%s) - start) ))
  [ $left -gt 70 ] || { echo "skip eager $backend: time"; continue; }
  opt=""; [ $backend = default ] || opt="--backend $backend"
  timeout $left python3 bench/e2e_benchmark.py --models hv15-t2v --lengths 2x --modes eager --methods adaspa \
    $opt --budget-s $(( left - 20 )) --out $OUT/run --tag=-hv15-t2v-eager-adaspa-$backend \
    > $OUT/run/e2e-hv15-t2v-eager-adaspa-$backend.log 2>&1
  echo "hv15-t2v eager $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/e2e-*hv15-t2v-eager-adaspa-$backend.md 2>/dev/null | cut -d'|' -f5,6,8,13 | cut -c1-260
done
cd $OUT && tar czf run.tgz run && rm -rf run
