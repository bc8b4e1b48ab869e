#!/usr/bin/env bash
# Sourced by the GPU call scripts under bench/results/*-runs/: `t LIMIT NAME PYTEST_ARGS...` runs pytest verbosely
# within LIMIT seconds into $R/gpu-tests-NAME.log and prints its counts and first failures (needs R and start set).
t() { local limit=$1 name=$2; shift 2
  timeout $limit python3 -P -m pytest -v -p no:cacheprovider -rfE --tb=short "$@" > $R/gpu-tests-$name.log 2>&1
  echo "$name rc=$? at $(( $(date +%s) - start )) s: $(grep -c PASSED $R/gpu-tests-$name.log) passed," \
       "$(grep -c FAILED $R/gpu-tests-$name.log) failed, $(grep -c SKIPPED $R/gpu-tests-$name.log) skipped"
  grep -E "^FAILED|^ERROR" $R/gpu-tests-$name.log | head -5 | cut -c1-300; }
