"""The pipeline depth a Triton launch takes on a GPU with less shared memory than the H200's
(``backends/cuda/shared_memory.py``): compiled candidates, deepest first; a clear error where none fits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparsecore.backends.cuda import shared_memory

# bytes the block-sparse kernel's 128 x 128 tiles at head dim 128 need on sm89 (Triton 3.6; test_triton_targets.py)
NEEDED = {3: 163_840, 2: 98_304, 1: 98_304}


def compiled_at(stages: int) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(shared=NEEDED[stages]))


@pytest.mark.parametrize("limit, stages", [(232_448, 3), (166_912, 3), (101_376, 2)])   # H200, A100, RTX 4090
def test_the_deepest_pipeline_that_fits_the_gpu(monkeypatch, limit, stages):
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: limit)
    assert shared_memory.fitting_stages(compiled_at, 3, "kernel") == stages


def test_none_fits_names_each_depth_and_the_remedy(monkeypatch):
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 65_536)              # a T4
    with pytest.raises(RuntimeError, match=r"triton lowering \(x\): no pipeline depth fits the 65536 bytes .*"
                                           r"3 stage\(s\): 163840 bytes; 2 stage\(s\): 98304 bytes; 1 stage\(s\): "
                                           r"98304 bytes\); pass smaller tiles"):
        shared_memory.fitting_stages(compiled_at, 3, "triton lowering (x)")


def test_without_a_compiled_kernel_to_read_nothing_is_decided(monkeypatch):
    """A JIT hook may give no compiled kernel: None (the launch keeps its configured stages and decides next time)."""
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 65_536)
    assert shared_memory.fitting_stages(lambda stages: None, 3, "kernel") is None


def test_an_asynchronous_compile_is_waited_for(monkeypatch):
    """Under ``triton.AsyncCompileMode`` a warm-up gives a future: its kernel decides."""
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: 101_376)
    future = lambda stages: SimpleNamespace(result=lambda: compiled_at(stages))   # noqa: E731
    assert shared_memory.fitting_stages(future, 3, "kernel") == 2
