#!/usr/bin/env bash
# Forty-fourth session, call a (FA4 staged: fa4-stage.sh 1, then this with .fa4/2 and .whl): issue 13's kernel table
# in one run (bench/fa4_check.py: 19 exactness checks, then cuDNN dense, FA4 dense, FA4's own block-sparse call and
# the default timed together in interleaved rounds). run44c.sh follows on the warm machine.
set -u
bash .fa4/2/fa4-stage.sh 2 || exit 3
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$PWD/bench PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait
R=$OUT/run; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $R/gpu.txt
timeout 560 python3 bench/fa4_check.py --out $R > $R/fa4-check.log 2>&1; echo "fa4-check rc=$?"
grep -v "UserWarning\|exe_args\|warnings.warn" $R/fa4-check.log | grep "eff TFLOP\|FAIL\|Failures" | cut -c1-200
cd $OUT && tar czf run.tgz run && rm -rf run
