#!/usr/bin/env bash
# Thirtieth session: CogVideoX 1.5's AdaSpa steps on fa4 were 5.49 s (run30c) then 7.41 s (run30d, keep_bits' bit
# values on the device): fa4, Triton, fa4 again side by side, and keep_bits itself timed at CogVideoX's size.
set -u
export SPARSECORE_WARMUP=wait TRITON_INTERPRET=0
mkdir -p $OUT/run
start=$(date +%s)
timeout 60 python3 - > $OUT/run/keep-bits.log 2>&1 <<'PY'
import torch, triton.testing
from sparsecore.backends.cuda.fa4_tile_lists import keep_bits
gen = torch.Generator(device="cuda").manual_seed(0)
rows, blocks, nnz = 48 * 1343, 1343, 17_700_000
row_of_entry = torch.sort(torch.randint(0, rows, (nnz,), device="cuda", generator=gen)).values
indices = torch.randint(0, blocks, (nnz,), device="cuda", generator=gen, dtype=torch.int32)
print("keep_bits ms", triton.testing.do_bench(lambda: keep_bits(row_of_entry, indices, rows, blocks)))
PY
cat $OUT/run/keep-bits.log | tail -2
for run in cogvideox-1.5:fa4 cogvideox-1.5:triton cogvideox-1.5:fa4; do
  model=${run%%:*}; backend=${run##*:}
  left=$(( 330 - ($(date +%s) - start) ))
  [ $left -gt 60 ] || { echo "skip $model $backend: time"; continue; }
  timeout $left python3 bench/e2e_benchmark.py --models $model --lengths 2x --modes eager --methods adaspa \
    --backend $backend --budget-s $(( left - 20 )) --out $OUT/run/$backend-$(date +%s) --tag=-$model-adaspa-$backend \
    > $OUT/run/e2e-$model-adaspa-$backend-$(date +%s).log 2>&1
  echo "$model $backend rc=$? at $(( $(date +%s) - start )) s"
  grep -h "| adaspa" $OUT/run/$backend-*/e2e-*.md 2>/dev/null | tail -1 | cut -d'|' -f5,6 | cut -c1-200
done
cd $OUT && tar czf run.tgz run && rm -rf run         # $OUT brings back at most ~8 files: one archive
