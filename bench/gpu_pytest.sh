#!/usr/bin/env bash
# Sourced by the GPU call scripts under bench/results/*-runs/: `t LIMIT NAME PYTEST_ARGS...` runs pytest verbosely
# within LIMIT seconds into $R/gpu-tests-NAME.log and prints its counts and first failures (needs R and start set).
# Counts read pytest's verbose lines only ("... PASSED  [ 50%]"): -rfE's summary repeats each failure.
t() { local limit=$1 name=$2; shift 2
  local log=$R/gpu-tests-$name.log
  timeout $limit python3 -P -m pytest -v -p no:cacheprovider -rfE --tb=short "$@" > $log 2>&1
  local rc=$?
  count() { grep -cE " ($1)( \(.*\))? +\[ *[0-9]+%\]" $log; }
  echo "$name rc=$rc at $(( $(date +%s) - start )) s: $(count PASSED) passed, $(count 'FAILED|ERROR') failed or" \
       "errors, $(count SKIPPED) skipped"
  grep -E "^FAILED|^ERROR" $log | head -5 | cut -c1-300; }
