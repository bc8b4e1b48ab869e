#!/usr/bin/env bash
# Twenty-third session, call 7 (after FA4's two stages): after the review. LTX-Video 2x eager (q, k, v made one
# statement each: the eager peak), LTX-2 with the released checkpoint's split RoPE, eager 1x/2x and compiled 2x.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
timeout 120 python3 bench/e2e_benchmark.py --models ltx --lengths 2x --modes eager --budget-s 100 \
  --methods lvsa dense-sparsecore --out $OUT/run --tag=-ltx-peak > $OUT/run/e2e-ltx-peak-eager.log 2>&1
tail -3 $OUT/run/e2e-ltx-peak-eager.log
timeout 230 python3 bench/e2e_benchmark.py --models ltx2 --modes eager --budget-s 210 \
  --out $OUT/run --tag=-ltx2-split > $OUT/run/e2e-ltx2-split-eager.log 2>&1
tail -6 $OUT/run/e2e-ltx2-split-eager.log
timeout 230 python3 bench/e2e_benchmark.py --models ltx2 --lengths 2x --modes compiled --budget-s 210 \
  --out $OUT/run --tag=-ltx2-split-compiled > $OUT/run/e2e-ltx2-split-compiled.log 2>&1
tail -6 $OUT/run/e2e-ltx2-split-compiled.log
