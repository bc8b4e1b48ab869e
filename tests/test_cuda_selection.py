"""Which CUDA lowering compile() prefers per mask class (the measured table of backends/cuda/selection.py).

No GPU needed: the three CUDA backends are made to report themselves available, and only the
choice before any call is checked (nothing is lowered or run).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask
from sparsecore.ir import Unselected
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


def joint(video: int, text: int, block: int = 64) -> BlockMask:
    """Video then text tokens, each cut into ``block``-token blocks: the short last video block sits inside."""
    offsets = np.concatenate([BlockMask.uniform_offsets(video, block),
                              video + BlockMask.uniform_offsets(text, block)[1:]])
    keep = np.eye(len(offsets) - 1, dtype=bool)
    return BlockMask.from_lists([[np.flatnonzero(r) for r in keep]] * 2, offsets, offsets)


def text_first(text: int, video: int, block: int = 64) -> BlockMask:
    """Text then video tokens, each cut into ``block``-token blocks (``VideoGeometry(text_position="start")``)."""
    offsets = np.concatenate([BlockMask.uniform_offsets(text, block),
                              text + BlockMask.uniform_offsets(video, block)[1:]])
    keep = np.eye(len(offsets) - 1, dtype=bool)
    return BlockMask.from_lists([[np.flatnonzero(r) for r in keep]] * 2, offsets, offsets)


def approximating(mask: BlockMask) -> BlockMask:
    return dataclasses.replace(mask, unselected=Unselected.parse("grouped-first-order:32"))


def causal_frames(groups: int, group: int, block: int) -> BlockMask:
    """``groups`` causal blocks of ``group`` tokens, each cut into ``block``-token blocks (its last one short)."""
    inner = BlockMask.uniform_offsets(group, block)
    offsets = np.concatenate([[0]] + [g * group + inner[1:] for g in range(groups)])
    keep = np.eye(len(offsets) - 1, dtype=bool)
    return BlockMask.from_lists([[np.flatnonzero(r) for r in keep]] * 2, offsets, offsets)


@pytest.mark.parametrize("mask, largest, block_class", [
    (frames(64, 40), 64, "uniform-64"),
    (frames(64, 40, text=24), 64, "uniform-64"),     # Wan at 6x: 2,949 blocks of 64 and a last one of 24
    (frames(32, 40), 32, "small"),
    (joint(40 * 64 - 10, 200), 64, "joint-64"),      # 64-token blocks, the video's last and the text's last short
    (joint(40 * 64 - 10, 256), 64, "joint-64"),      # HunyuanVideo 1.5's text: one short block
    (joint(40 * 64, 200), 64, "uniform-64"),         # the video ends on the grid: only the last block is short
    (joint(40 * 64 - 10, 200, block=96), 96, "small"),
    (joint(40 * 64 - 10, 200, block=32), 32, "small"),
    (causal_frames(4, 100, 64), 64, "small"),         # a short block in every causal block (SkyReels-V2 DF)
    (causal_frames(2, 2400, 64), 64, "small"),        # two causal blocks: a whole causal block after the first short
    (text_first(226, 40 * 64 - 10), 64, "small"),     # the text first: the whole video after its short block
    (joint(40 * 64 - 10, 1400), 64, "small"),         # more text than a joint model's
    (joint(6 * 64 - 10, 500), 64, "small"),           # more text than video
    (approximating(joint(40 * 64 - 10, 200)), 64, "small"),   # PASA's: the approximation pass
    (slice_mask(joint(40 * 64 - 10, 200), (0, 1280), (1280, 2750)), 64, "small"),   # a ring step: other keys
    (BlockMask.from_lists([[[0], [1]]], [0, 40, 70], [0, 40, 70]), 40, "small"),      # no 64-token block first
    (frames(128, 8), 128, "tile-aligned"),
    (frames(1560, 3), 1560, "frames"),
    (frames(1560, 3, text=200), 1560, "frames"),     # a short last block: the interior decides
])
def test_block_class_and_largest_block(mask, largest, block_class):
    """The class that ranks the CUDA lowerings (no GPU needed): masks whose blocks are all under 128 tokens are
    small whatever their sizes, and 64-token ones (a shorter last one allowed) form their own class."""
    from sparsecore.backends.cuda.selection import block_class as class_of
    assert mask.largest_block_size("kv") == mask.largest_block_size("q") == largest
    assert class_of(mask) == block_class


@pytest.mark.parametrize("mask, expected", [
    (frames(128, 8), "fa4"),                  # tile-aligned: FA4's full tiles
    (frames(256, 4), "fa4"),
    (frames(64, 40), "fa4"),                  # AdaSpa's 64-token blocks: FA4 at two CTAs per SM
    (frames(64, 40, text=24), "fa4"),         # the same with a shorter last block
    (frames(32, 40), "triton"),               # other small blocks: not timed on fa4 at two CTAs per SM
    (frames(1560, 3), "fa4"),                 # LVSA's frames
    (frames(1560, 3, text=200), "fa4"),       # frames + a text block: mixed sizes
    (slice_mask(frames(64, 40), (1300, 2560), (1300, 2560)), "triton"),   # a ring shard: first block cut short
    (joint(40 * 64 - 10, 200), "fa4"),        # CogVideoX's joint sequence: 64-token blocks and two short ones
    (joint(40 * 64 - 10, 256), "fa4"),        # HunyuanVideo 1.5's
    (approximating(joint(40 * 64 - 10, 200)), "triton"),                   # PASA's
    (slice_mask(joint(40 * 64 - 10, 200), (1300, 2614), (1300, 2614)), "triton"),   # a ring shard: first block cut
    (causal_frames(4, 100, 64), "triton"),    # frame-causal: a short block in every causal block
])
def test_default_lowering_per_block_class(cuda_available, mask, expected):
    assert sparsecore.compile(mask, device="cuda").backend.name == expected


def test_flashinfer_is_not_offered_more_block_rows_than_its_plan_takes(cuda_available):
    offsets = BlockMask.uniform_offsets(2949 * 64, 64)                       # AdaSpa at 6x: 12 heads x 2,949
    indptr = np.arange(12 * 2949 + 1).reshape(-1)[np.arange(12)[:, None] * 2949 + np.arange(2950)[None, :]]
    big = BlockMask(12, offsets, offsets, indptr, np.tile(np.arange(2949), 12))     # the diagonal only
    problems = sparsecore.registered_backends()["flashinfer"].capabilities.mask_problems(big)
    assert any(p.startswith("max_rows:") for p in problems)


def hopper_config(monkeypatch, mask: BlockMask):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = SimpleNamespace(shape=(1, 2, mask.q_len, 128), element_size=lambda: 2, device=torch.device("cuda"))
    config = TritonLaunch(mask, TritonOptions()).config(q)
    return config.block_m, config.block_n


@pytest.mark.parametrize("block, tile", [(64, 64), (1560, 128)])
def test_triton_tiles_fit_the_blocks_of_a_ring_shard(monkeypatch, block, tile):
    """A shard edge cuts the first block short; the tiles still fit the blocks inside (on a Hopper GPU)."""
    shard = slice_mask(frames(block, 40), (block * 20 + block // 3, block * 40), (0, block * 40))
    assert hopper_config(monkeypatch, shard) == (tile, tile)


@pytest.mark.parametrize("mask, tiles", [
    (joint(40 * 64 - 10, 200), (64, 64)),           # 64-token blocks with short ones inside: 64-wide tiles
    (joint(40 * 64 - 10, 200, block=32), (64, 64)),
    (frames(1560, 3, text=200), (128, 128)),        # frames and a text block
    (joint(40 * 64 - 10, 200, block=96), (128, 128)),
])
def test_triton_tiles_cover_the_largest_block(monkeypatch, mask, tiles):
    """Tiles are 64 wide when no block is wider (HunyuanVideo 1.5's joint masks: a 128-wide tile over 64-token
    blocks computes twice the pairs kept), else 128."""
    assert hopper_config(monkeypatch, mask) == tiles


def test_triton_says_why_it_does_not_run_below_compute_capability_8(monkeypatch):
    """A T4 or V100: Triton would run the products on CUDA cores and its head-dim-128 tiles would not fit the shared
    memory (tests/test_triton_targets.py compiles them for sm75); the backend says so, and compile takes another."""
    backend = sparsecore.registered_backends()["triton"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(sparsecore.backends.cuda.interpreter, "interpreting", lambda: False)
    monkeypatch.setattr(sparsecore.backends.cuda.interpreter, "active", lambda: False)
    reason = backend.unavailable_reason("cuda")
    assert reason is not None and reason.startswith("compute capability 7.5: below 8.0") and "portable" in reason
    from sparsecore.backends.cuda import block_mass, search_attention      # AdaSpa's search passes: torch's there
    q = SimpleNamespace(shape=(1, 2, 256, 128), dtype=torch.float16, device=torch.device("cuda"))
    offsets = np.arange(0, 257, 100).clip(max=256)
    assert block_mass.supports(q, q, offsets, offsets) == reason
    assert search_attention.supports(q, q, q, offsets, offsets) == reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert backend.unavailable_reason("cuda") is None
    assert block_mass.supports(q, q, offsets, offsets) is None


@pytest.mark.parametrize("capability", [(7, 0), (7, 5)])
def test_flashinfer_declines_gpus_below_ampere_with_the_reason(monkeypatch, capability):
    """FlashInfer documents compute capability 7.5 and later, bfloat16 from 8.0; this lowering was run on 8.0 and
    later only, so on a T4 or V100 selection passes it by (saying why) instead of failing at the first call."""
    backend = sparsecore.registered_backends()["flashinfer"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    reason = backend.unavailable_reason("cuda:0")
    assert reason is not None and f"{capability[0]}.{capability[1]}" in reason and "portable" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert backend.unavailable_reason("cuda:0") is None
