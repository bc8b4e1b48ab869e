#!/usr/bin/env bash
# Twenty-fifth session, call 2 of a second machine (after FA4's two stages): NABLA on Kandinsky 5 Lite-shaped blocks,
# sparsecore's method="nabla" against diffusers' own NABLA (FlexAttention, compiled), 61 latent frames.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/run/gpu.txt
timeout 420 python3 bench/nabla_benchmark.py --out $OUT/run --frames 61 > $OUT/run/nabla-2x.log 2>&1
grep -v "Warning\|warn(" $OUT/run/nabla-2x.log | tail -22 | cut -c1-400
