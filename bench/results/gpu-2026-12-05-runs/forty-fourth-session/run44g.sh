#!/usr/bin/env bash
# Forty-fourth session, call g (no FA4): the approximating masks at float32 scores near 1e8 on CUDA (portable and
# triton; the torch merge now normalises by division), then the global-first-order pass under each tile config
# (approximation_benchmark --sweep --sweep-kinds global-first-order: it ran at 27.63 ms against zeroth's 14.32 on `d/`).
set -u
export PYTHONPATH=$PWD:$PWD/bench PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_unselected_match_oracle.py -k "1e8 or named or float64_rows" -rfE \
  > $R/unselected-cuda.log 2>&1; echo "unselected rc=$?"; tail -2 $R/unselected-cuda.log
timeout 170 python3 bench/approximation_benchmark.py --out $R --sizes 188760 --no-check --sweep \
  --sweep-kinds global-first-order > $R/approximation-global.log 2>&1; echo "sweep rc=$?"
grep -E "^[0-9]+x[0-9]+ w" $R/approximation-global.log; grep "global-first-order" $R/approximation-global.log | tail -2 | cut -c1-250
cd $OUT && tar czf run.tgz run && rm -rf run
