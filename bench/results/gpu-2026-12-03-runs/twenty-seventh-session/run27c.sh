#!/usr/bin/env bash
# Twenty-seventh session, call 3: STA kernels again (FlexAttention's block mask built compiled), then Wan 1.3B 6x.
set -u
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
start=$(date +%s)
timeout 330 python3 bench/sta_benchmark.py --st-attn .fa4/2/st_attn_triton.py --out $OUT/run \
  > $OUT/run/sta-kernels.log 2>&1
echo "kernels rc=$? in $(( $(date +%s) - start )) s"; grep -v '^{' $OUT/run/sta-kernels.log | tail -8 | cut -c1-600
cat $OUT/run/sta-kernels.md
left=$(( 560 - ($(date +%s) - start) ))
timeout $left python3 bench/e2e_benchmark.py --models wan-1.3b --lengths 6x --modes eager --methods sta \
  --budget-s $(( left - 30 )) --out $OUT/run --tag=-sta-6x > $OUT/run/e2e-sta-6x.log 2>&1
echo "e2e 6x rc=$? at $(( $(date +%s) - start )) s"; tail -6 $OUT/run/e2e-sta-6x.log
