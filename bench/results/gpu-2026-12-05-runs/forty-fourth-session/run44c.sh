#!/usr/bin/env bash
# Forty-fourth session, call c (on the machine run44a.sh left warm, FA4 still in /tmp/site): the AdaSpa-shaped 6x
# mask on triton and fa4 (key_split_probe, interleaved rounds: issue 13's 1.3x), then PASA's 6x mask drop-only
# against grouped first order as compile() runs them (approximation_benchmark: issue 16's 1.15x).
set -u
[[ -d /tmp/site/flash_attn ]] || { echo "FA4 is not staged on this machine (a fresh one): stage again"; exit 3; }
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 250 python3 bench/key_split_probe.py --out $R --backends triton,fa4 > $R/key-split.log 2>&1
echo "key-split rc=$?"; grep "^|\|ratio\|triton /" $R/key-split.log | cut -c1-200
timeout 300 python3 bench/approximation_benchmark.py --out $R --sizes 188760 --no-check > $R/approximation.log 2>&1
echo "approximation rc=$?"; tail -5 $R/approximation.log | cut -c1-300
cd $OUT && tar czf run.tgz run && rm -rf run
