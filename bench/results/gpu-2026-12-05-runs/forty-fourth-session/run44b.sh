#!/usr/bin/env bash
# Forty-fourth session, call b (FA4 staged: fa4-stage.sh 1, then this with .fa4/2 and .whl): bench/fa4_wave_probe.py,
# whether FA4's partial last wave of CTAs explains the 32K d=0.1 gap (issue 13).
set -u
bash .fa4/2/fa4-stage.sh 2 || exit 3
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 240 python3 bench/fa4_wave_probe.py --out $R > $R/fa4-waves.log 2>&1; echo "fa4-waves rc=$?"
grep -v "UserWarning\|exe_args\|warnings.warn" $R/fa4-waves.log | tail -24 | cut -c1-200
cd $OUT && tar czf run.tgz run && rm -rf run
