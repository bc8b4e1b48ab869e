#!/usr/bin/env bash
# Twenty-fourth session, call 2 (after FA4's two stages): Kandinsky 5 Lite end to end at 2x (61 latent frames), eager.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait HYPOTHESIS_PROFILE=gpu-quick
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
timeout 380 python3 bench/e2e_benchmark.py --models kandinsky5 --lengths 2x --modes eager --budget-s 350 \
  --out $OUT/run --tag=-kandinsky5 > $OUT/run/e2e-kandinsky5-eager.log 2>&1
tail -8 $OUT/run/e2e-kandinsky5-eager.log
