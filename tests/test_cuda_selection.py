"""Which CUDA lowering compile() prefers per mask class (the measured table of backends/cuda/selection.py).

No GPU needed: the three CUDA backends are made to report themselves available, and only the
choice before any call is checked (nothing is lowered or run).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.cuda.triton_launch import TritonLaunch
from sparsecore.backends.cuda.triton_config import TritonOptions
from sparsecore.ir.slicing import slice_mask


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
    (slice_mask(frames(64, 40), (1300, 2560), (1300, 2560)), "triton"),   # a ring shard: first block cut short
])
def test_default_lowering_per_block_class(cuda_available, mask, expected):
    assert sparsecore.compile(mask, device="cuda").backend.name == expected


def test_flashinfer_is_not_offered_more_block_rows_than_its_plan_takes(cuda_available):
    offsets = BlockMask.uniform_offsets(2949 * 64, 64)                       # AdaSpa at 6x: 12 heads x 2,949
    indptr = np.arange(12 * 2949 + 1).reshape(-1)[np.arange(12)[:, None] * 2949 + np.arange(2950)[None, :]]
    big = BlockMask(12, offsets, offsets, indptr, np.tile(np.arange(2949), 12))     # the diagonal only
    problems = sparsecore.registered_backends()["flashinfer"].capabilities.mask_problems(big)
    assert any(p.startswith("max_rows:") for p in problems)


@pytest.mark.parametrize("block, tile", [(64, 64), (1560, 128)])
def test_triton_tiles_fit_the_blocks_of_a_ring_shard(monkeypatch, block, tile):
    """A shard edge cuts the first block short; the tiles still fit the blocks inside (on a Hopper GPU)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    shard = slice_mask(frames(block, 40), (block * 20 + block // 3, block * 40), (0, block * 40))
    q = SimpleNamespace(shape=(1, 2, shard.q_len, 128), element_size=lambda: 2, device=torch.device("cuda"))
    config = TritonLaunch(shard, TritonOptions()).config(q)
    assert (config.block_m, config.block_n) == (tile, tile)
