"""Test configuration: Hypothesis profiles and the cross-device matrix printed at the end.

Profiles: ``ci`` (derandomized, bounded: reproducible in CI), ``dev`` (random, more
examples), ``gpu`` (as ``ci`` but no shrinking: on a GPU machine every example may compile a
kernel, so the first failing example is reported as found), ``gpu-quick`` (as ``gpu`` with 8
examples a property: on the lent H200 the generated suites of ``fa4`` with approximating masks did
not finish within a 330 s call at 40, each new tile shape or pass variant compiling for seconds).
Pick with ``HYPOTHESIS_PROFILE``; the default is ``dev``.
"""

from __future__ import annotations

import os
import sys
import contextlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: oracle, strategies, targets

import sparsecore  # noqa: E402
from targets import all_targets  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("gpu", parent=settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("gpu-quick", parent=settings.get_profile("gpu"), max_examples=8)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# A kernel's first call runs the backend compile() prefers, as the GPU tests of selection expect; tests/test_warmup.py
# tests the library's default (warming a slow backend up behind another) explicitly.
os.environ.setdefault("SPARSECORE_WARMUP", "wait")


@pytest.fixture(autouse=True)
def seeded_global_rngs():
    """Every test starts from the same global torch (CPU and CUDA) and NumPy states: a test that draws without a
    generator of its own still draws the same numbers on every run."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def triton_device():
    """Where Triton kernels run: "cuda", or "cpu" through Triton's interpreter (TRITON_INTERPRET=1, as CI does)
    inside the Triton backend's emulator; otherwise the test skips with the backend's reason."""
    backend = sparsecore.registered_backends()["triton"]
    emulator = backend.emulator()
    if emulator is None and backend.unavailable_reason("cuda") is not None:
        pytest.skip(f"triton on cuda: {backend.unavailable_reason('cuda')} (or set TRITON_INTERPRET=1)")
    with emulator or contextlib.nullcontext():
        yield "cpu" if emulator is not None else "cuda"


_MATRIX: dict = defaultdict(lambda: {"ran": 0, "passed": 0, "failed": 0, "skipped": 0, "reason": ""})


def pytest_runtest_logreport(report):
    target = dict(report.user_properties).get("target")
    if target is None:
        return
    row = _MATRIX[target]
    if report.skipped:
        row["skipped"] += 1
        row["reason"] = row["reason"] or str(report.longrepr[2]).removeprefix("Skipped: ")
    elif report.when == "call":
        row["ran"] += 1
        row["passed" if report.passed else "failed"] += 1
    elif report.failed:  # an error in setup or teardown
        row["failed"] += 1


def pytest_terminal_summary(terminalreporter):
    if not _MATRIX:
        return
    write = terminalreporter.write_line
    terminalreporter.section("cross-device matrix: every registered backend x device")
    pairs = sorted({t.matrix_row for t in all_targets()})
    write(f"{'backend':<12}{'device':<16}{'ran':>5}{'passed':>8}{'failed':>8}{'skipped':>9}  reason")
    for pair in pairs:
        row = _MATRIX[pair]
        write(f"{pair[0]:<12}{pair[1]:<16}{row['ran']:>5}{row['passed']:>8}{row['failed']:>8}{row['skipped']:>9}"
              f"  {row['reason'][:90]}")
