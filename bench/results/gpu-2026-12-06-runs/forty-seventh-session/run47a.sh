#!/usr/bin/env bash
# Forty-seventh session, call a (no FA4): the forty-sixth session's call v (never run there: its device time was
# spent), then the property suite against the float64 oracle for the Triton lowering on CUDA, and the tests of this
# session's kernel change (a first key tile of -inf scores: Triton's walk and the fused search pass) and of compile()
# under torch.compile (FlashInfer left out: its JIT takes minutes on a fresh machine; FA4 is not staged here).
set -u
start=$(date +%s)
bash bench/results/gpu-2026-12-05-runs/forty-sixth-session/run46v.sh
export PYTHONPATH=/tmp/site:$PWD:$PWD/bench:$PWD/tests PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 SPARSECORE_WARMUP=wait \
  HYPOTHESIS_PROFILE=gpu-quick
R=$OUT/oracle; mkdir -p $R
source bench/gpu_pytest.sh
t 150 triton tests/test_backends_match_oracle.py -k "triton"
t 120 nonfinite tests/test_nonfinite_isolation.py tests/test_block_mass_triton.py -k "not flashinfer"
t 90 compiled tests/test_torch_compile_kernel.py
cd $OUT && tar czf oracle.tgz oracle && rm -rf oracle
