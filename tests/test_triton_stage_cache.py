"""The pipeline depth a Triton launch decides once and keeps (``TritonLaunch.stages`` in
``backends/cuda/triton_launch.py``), and the shared-memory limit's edge in ``fitting_stages``.

A depth is kept per config, dtype, launch constants, 16-byte alignment, capability and device limit: a launch that
differs in any of them compiles afresh. The user's ``num_stages`` is taken as given, and a depth that could not be
decided (no compiled kernel to read) is not kept. These run on the CPU: the GPU is faked as an sm89 (RTX 4090) whose
shared-memory limit the test sets, and ``compile_at`` reports the bytes each depth needs, as Triton's compiled
kernel does (``metadata.shared``).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparsecore import BlockMask
from sparsecore.backends.cuda import interpreter, shared_memory, triton_launch
from sparsecore.backends.cuda.triton_config import TritonConfig, TritonOptions

RTX_4090, H200 = 101_376, 232_448                 # bytes of shared memory a block may use
# bytes the block-sparse kernel's 128 x 128 tiles at head dim 128 need on sm89 (tests/test_shared_memory.py), and an
# unaligned launch's, whose loads Triton does not pipeline (the figure in TritonLaunch.stages' docstring)
ALIGNED = {3: 163_840, 2: 98_304, 1: 98_304}
UNALIGNED = {3: 98_328, 2: 98_328, 1: 98_328}
CONFIG = TritonConfig(block_m=128, block_n=128, num_warps=8, num_stages=3, use_tma=False)
LSE = {"HEAD_DIM": 128, "WRITE_LSE": True}
NO_LSE = {"HEAD_DIM": 128, "WRITE_LSE": False}
ALL_ALIGNED, NONE_ALIGNED = (True,) * 4, (False,) * 4


class Compiles:
    """``compile_at``: the kernel compiled at a depth, reporting the bytes ``needs`` gives it; records each depth."""

    def __init__(self, needs: dict[int, int] | None) -> None:
        self.needs, self.depths = needs, []

    def __call__(self, stages: int):
        self.depths.append(stages)
        if self.needs is None:                     # a JIT hook: no compiled kernel to read
            return None
        return SimpleNamespace(metadata=SimpleNamespace(shared=self.needs[stages]))


@pytest.fixture
def sm89(monkeypatch) -> SimpleNamespace:
    """Not interpreting, an sm89 device with the RTX 4090's limit (``limit.bytes`` changes it), no depth kept."""
    limit = SimpleNamespace(bytes=RTX_4090)
    monkeypatch.setattr(interpreter, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: limit.bytes)
    monkeypatch.setattr(triton_launch, "_STAGES", {})
    return limit


def launch(num_stages: int | None = None) -> triton_launch.TritonLaunch:
    return triton_launch.TritonLaunch(BlockMask.full(1, 128, 128, 64), TritonOptions(num_stages=num_stages))


Q = torch.zeros(1, 1, 128, 128, dtype=torch.bfloat16)


@pytest.mark.parametrize("first, second", [((LSE, NONE_ALIGNED), (LSE, ALL_ALIGNED)),
                                           ((NO_LSE, ALL_ALIGNED), (LSE, ALL_ALIGNED))],
                         ids=["alignment", "launch constants"])
def test_a_launch_with_another_key_decides_its_own_depth(sm89, first, second):
    """Three stages fit the first launch (98,328 bytes unaligned or without the LSE); the second would need 163,840
    at three: it takes two, decided afresh, not the first launch's depth."""
    run = launch()
    assert run.stages(CONFIG, Q, first, Compiles(UNALIGNED)) == 3
    later = Compiles(ALIGNED)
    assert run.stages(CONFIG, Q, second, later) == 2
    assert later.depths == [3, 2]


def test_a_gpu_with_less_shared_memory_decides_its_own_depth(sm89):
    run = launch()
    sm89.bytes = H200
    assert run.stages(CONFIG, Q, (LSE, ALL_ALIGNED), Compiles(ALIGNED)) == 3
    sm89.bytes = RTX_4090
    smaller = Compiles(ALIGNED)
    assert run.stages(CONFIG, Q, (LSE, ALL_ALIGNED), smaller) == 2
    assert smaller.depths == [3, 2]


def test_a_decided_depth_is_reused_without_compiling(sm89):
    run = launch()
    assert run.stages(CONFIG, Q, (LSE, ALL_ALIGNED), Compiles(ALIGNED)) == 2
    again = Compiles(ALIGNED)
    assert run.stages(CONFIG, Q, (LSE, ALL_ALIGNED), again) == 2
    assert again.depths == []


def test_the_users_num_stages_is_taken_as_given(sm89):
    """``num_stages=3`` from the user: three, though it overflows this GPU, and nothing is compiled to check."""
    compiles = Compiles(ALIGNED)
    assert launch(num_stages=3).stages(CONFIG, Q, (LSE, ALL_ALIGNED), compiles) == 3
    assert compiles.depths == [] and triton_launch._STAGES == {}


def test_without_a_compiled_kernel_to_read_the_configs_depth_runs_and_nothing_is_kept(sm89):
    run = launch()
    assert run.stages(CONFIG, Q, (LSE, ALL_ALIGNED), Compiles(None)) == 3
    assert triton_launch._STAGES == {}
    later = Compiles(ALIGNED)                     # the next launch decides
    assert run.stages(CONFIG, Q, (LSE, ALL_ALIGNED), later) == 2
    assert later.depths == [3, 2]


def test_a_kernel_that_needs_exactly_the_limit_fits(monkeypatch):
    """Triton refuses a launch only where the kernel needs more than the limit (``metadata.shared > max_shared``)."""
    monkeypatch.setattr(shared_memory, "shared_memory_limit", lambda: ALIGNED[2])
    assert shared_memory.fitting_stages(Compiles(ALIGNED), 3, "kernel") == 2
