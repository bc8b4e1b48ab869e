"""Padding blocks (``BlockMask.with_padding``): a mask extended over a batch's text padding keeps its semantics (the
padding's rows attend to nothing, no row attends to the padding) and its block sizes (kernels tile it as they tile the
mask), and joint masks so padded keep their class on CUDA."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import run_and_compare
from oracle import dense_attention, expand_to_tokens
from targets import all_targets
from test_block_mask_device import host_masks
from test_cuda_selection import approximating, joint

import sparsecore
from sparsecore import BlockMask
from sparsecore.backends.cuda.selection import block_class
from sparsecore.backends.cuda.triton_config import TritonOptions
from sparsecore.backends.cuda.triton_launch import TritonLaunch


@settings(max_examples=60)
@given(mask=host_masks(), extra=st.integers(1, 300), on_device=st.booleans())
def test_padding_keeps_the_token_mask_and_the_largest_blocks(mask, extra, on_device):
    """By definition: the padded token mask is the mask's, zero beyond it; no padding block exceeds the largest."""
    length = max(mask.q_len, mask.kv_len) + extra
    padded = (mask.to("cpu") if on_device else mask).with_padding(length).to_host()
    assert padded.q_len == padded.kv_len == length
    expected = np.zeros((mask.num_heads, length, length), dtype=bool)
    expected[:, :mask.q_len, :mask.kv_len] = expand_to_tokens(mask)
    np.testing.assert_array_equal(expand_to_tokens(padded), expected)
    for side in ("q", "kv"):
        assert padded.largest_block_size(side) == mask.largest_block_size(side)
    np.testing.assert_array_equal(padded.q_offsets[:mask.num_q_blocks + 1], mask.q_offsets)
    np.testing.assert_array_equal(padded.kv_offsets[:mask.num_kv_blocks + 1], mask.kv_offsets)


def test_a_padded_mask_runs_to_the_oracle():
    """The padding rows give 0 and LSE -inf, the others attend as the mask says (float64 dense oracle)."""
    rng = np.random.default_rng(3)
    offsets = np.array([0, 16, 32, 40, 56, 61])                       # 16-token blocks, the video's short last inside
    lists = [[np.flatnonzero(rng.random(5) < 0.5) for _ in range(5)] for _ in range(2)]
    padded = BlockMask.from_lists(lists, offsets, offsets).with_padding(100)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 100, 8))) for _ in range(3))
    out, lse = sparsecore.compile(padded, device="cpu")(q, k, v, return_lse=True)
    want, want_lse = dense_attention(q.numpy(), k.numpy(), v.numpy(), expand_to_tokens(padded), 8 ** -0.5)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=1e-5)
    assert (out[:, :, 61:] == 0).all() and torch.isneginf(lse[:, :, 61:]).all()


def padded_joint_mask(seed: int) -> BlockMask:
    """Video (182 tokens: 64-token blocks, a short last one) and 70 text tokens, each row keeping a random half of
    the blocks and the text's (a sink), text rows all; padded to 372 tokens."""
    offsets = np.array([0, 64, 128, 182, 246, 252])
    rng = np.random.default_rng(seed)
    lists = [[np.union1d(np.flatnonzero(rng.random(5) < 0.5), [3, 4]) if i < 3 else np.arange(5) for i in range(5)]
             for _ in range(2)]
    return BlockMask.from_lists(lists, offsets, offsets).with_padding(372)


@pytest.mark.parametrize("target", all_targets(), ids=lambda t: t.id)
def test_a_padded_joint_mask_matches_the_oracle_on_every_target(target):
    mask = padded_joint_mask(7)
    problems = target.capabilities.mask_problems(mask)
    if problems:
        pytest.skip(f"{target.backend} does not take this block layout: {problems[0]}")
    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 372, 64)) for _ in range(3))
    with target.running():
        run_and_compare(target, mask, q, k, v, device_held=True, model_layout=True)


def test_padding_refuses_bad_lengths_before_building_anything():
    mask = BlockMask.full(2, 48, 48, 16)
    with pytest.raises(ValueError, match="length: expected an int >= 49"):
        mask.with_padding(48)
    with pytest.raises(TypeError, match="length: expected an int"):
        mask.with_padding(60.0)
    tiny = BlockMask.full(4, 3, 3, 1)                 # 4 x 10**9 row pointers: int32 cannot index them
    with pytest.raises(ValueError, match="length: padding 3 query tokens to 1,000,000,000 adds"):
        tiny.with_padding(1_000_000_000)
    with pytest.raises(ValueError, match="unselected: with_padding expected a mask that drops"):
        approximating(mask).with_padding(64)


def hopper_tiles(monkeypatch, mask: BlockMask) -> tuple[int, int]:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = SimpleNamespace(shape=(1, 2, mask.q_len, 128), element_size=lambda: 2, device=torch.device("cuda"))
    config = TritonLaunch(mask, TritonOptions()).config(q)
    return config.block_m, config.block_n


@pytest.mark.parametrize("padding", [1, 40, 100, 300, 1800])
def test_a_padded_joint_mask_keeps_its_tiles_and_its_class(monkeypatch, padding):
    """HunyuanVideo 1.5 with a short prompt: the text's slots are mostly padding. One block over the padding made
    Triton tile 64-token blocks 128 wide (twice their work) and classed the mask as mixed or small sizes."""
    mask = joint(160 * 64 - 10, 150)
    padded = mask.with_padding(mask.q_len + padding)
    assert hopper_tiles(monkeypatch, padded) == hopper_tiles(monkeypatch, mask) == (64, 64)
    assert block_class(padded) == block_class(mask) == "joint-64"


@pytest.mark.parametrize("video, text, block_class_", [
    (100 * 64 - 10, 1305, "joint-64"),     # HunyuanVideo 1.5 with an image: 729 + 64 + 512 text tokens, all valid
    (200 * 64 - 10, 1985, "joint-64"),     # its pipeline's 1,985 slots (729 image, 256 ByT5, 1,000 Qwen2.5-VL)
    (200 * 64 - 10, 2100, "small"),        # more text than a joint model's
    (30 * 64 - 10, 600, "small"),          # more than a quarter of the video
])
def test_joint_class_bounds_the_text(video, text, block_class_):
    assert block_class(joint(video, text)) == block_class_


def test_joint_class_takes_one_short_block_inside_the_text():
    """The text's last block, then the padding's: a third short block after the video is neither."""
    def after_video(*sizes):
        offsets = np.concatenate([BlockMask.uniform_offsets(200 * 64 - 10, 64),
                                  200 * 64 - 10 + np.cumsum(sizes)])
        return BlockMask.from_lists([[np.array([i]) for i in range(len(offsets) - 1)]], offsets, offsets)
    assert block_class(after_video(64, 22, 64, 64, 10)) == "joint-64"
    assert block_class(after_video(64, 22, 64, 22, 64, 10)) == "small"
