#!/usr/bin/env bash
# Twenty-fifth session, call 2 of a third machine (after FA4's two stages): where Cosmos' compiled sparse steps add
# memory over the dense ones (bench/peak_trace.py: allocations alive at one forward's peak), 47 latent frames.
set -u
[ -f /tmp/site/.sparsecore-wheels ] || { echo "not staged"; exit 3; }
export SPARSECORE_WARMUP=wait
mkdir -p $OUT/run
timeout 300 python3 bench/peak_trace.py --model cosmos --length 2x --methods dense-sparsecore lvsa pasa \
  --out $OUT/run > $OUT/run/peak-trace.log 2>&1
grep -v "Warning\|warn(" $OUT/run/peak-trace.log | tail -60 | cut -c1-300
