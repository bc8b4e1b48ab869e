#!/usr/bin/env bash
# Thirtieth session: first calls since the conversion's Triton kernel (its compile joins FA4's in the warm-up's
# sample of an off-grid mask): LVSA's frames at 6x, fresh caches, no sampler.
set -u
export TRITON_INTERPRET=0
mkdir -p $OUT/run
timeout 280 python3 bench/first_call_probe.py --out $OUT/run --cases lvsa --no-sample > $OUT/run/first-call.log 2>&1
echo "first-call rc=$?"; grep "^|" $OUT/run/*.md | cut -c1-260 | head -20
