"""Which CUDA lowering compile() prefers per mask class (the measured table of backends/cuda/selection.py).

No GPU needed: the three CUDA backends are made to report themselves available, and only the
choice before any call is checked (nothing is lowered or run).
"""

from __future__ import annotations

import numpy as np
import pytest

import sparsecore
from sparsecore import BlockMask


@pytest.fixture
def cuda_available(monkeypatch):
    for name in ("triton", "fa4", "flashinfer"):
        monkeypatch.setattr(type(sparsecore.registered_backends()[name]), "unavailable_reason", lambda self, d: None)
    yield
    sparsecore.clear_cache()


def frames(block: int, count: int, text: int = 0) -> BlockMask:
    offsets = list(range(0, block * count + 1, block)) + ([block * count + text] if text else [])
    keep = np.eye(len(offsets) - 1, dtype=bool)
    return BlockMask.from_lists([[np.flatnonzero(r) for r in keep]] * 2, offsets, offsets)


@pytest.mark.parametrize("mask, expected", [
    (frames(128, 8), "fa4"),                  # tile-aligned: FA4's full tiles
    (frames(256, 4), "fa4"),
    (frames(64, 40), "triton"),               # AdaSpa's 64-token blocks: Triton measured faster
    (frames(1560, 3), "fa4"),                 # LVSA's frames
    (frames(1560, 3, text=200), "fa4"),       # frames + a text block: mixed sizes
])
def test_default_lowering_per_block_class(cuda_available, mask, expected):
    assert sparsecore.compile(mask, device="cuda").backend.name == expected


def test_flashinfer_is_not_offered_more_block_rows_than_its_plan_takes(cuda_available):
    offsets = BlockMask.uniform_offsets(2949 * 64, 64)                       # AdaSpa at 6x: 12 heads x 2,949
    indptr = np.arange(12 * 2949 + 1).reshape(-1)[np.arange(12)[:, None] * 2949 + np.arange(2950)[None, :]]
    big = BlockMask(12, offsets, offsets, indptr, np.tile(np.arange(2949), 12))     # the diagonal only
    problems = sparsecore.registered_backends()["flashinfer"].capabilities.mask_problems(big)
    assert any(p.startswith("max_rows:") for p in problems)
