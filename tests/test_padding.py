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


def test_padding_refuses_bad_lengths_before_building_anything(monkeypatch):
    from sparsecore.ir import padding
    mask = BlockMask.full(2, 48, 48, 16)
    with pytest.raises(ValueError, match=r"length: expected an int > 48 \(both sides are padded to one length.*got 48; "
                                         r"pass the padded length"):
        mask.with_padding(48)
    with pytest.raises(ValueError, match="length: expected an int > 48"):
        mask.with_padding(np.int64(-3))
    with pytest.raises(TypeError, match="length: expected an int"):
        mask.with_padding(60.0)
    tiny = BlockMask.full(4, 3, 3, 1)
    with pytest.raises(ValueError, match="length: padding 3 query and 3 key tokens to 1,000,000,000 adds 999,999,997"):
        tiny.with_padding(1_000_000_000)
    keys = BlockMask.from_lists([[np.array([0]), np.array([1])]], [0, 64, 128], np.arange(129))   # 1-token key blocks
    with pytest.raises(ValueError, match="adds 16,385 query and 1,048,577 key blocks"):
        keys.with_padding(128 + 2**20 + 1)
    assert keys.with_padding(128 + 2**20).num_kv_blocks == 128 + 2**20       # 2**20 a side at most
    with pytest.raises(ValueError, match="length: num_heads x q_len x kv_len"):
        BlockMask.full(4, 64, 64, 64).with_padding(2**31)
    with pytest.raises(ValueError, match="unselected: with_padding expected a mask that drops"):
        approximating(mask).with_padding(64)
    monkeypatch.setattr(padding, "padded_offsets", lambda *args: pytest.fail("built before its meta was checked"))
    with pytest.raises(ValueError, match="meta: expected a JSON-serializable dict"):
        mask.with_padding(64, meta={"x": object()})


def test_a_padded_mask_knows_the_mask_it_pads(monkeypatch):
    """``unpadded`` gives the mask back (its lists, on the host and on a device), through a second padding, copies on
    other devices, a choice of heads and the planner's padding (whose facts it shares with the mask it pads); a mask
    that was not padded is its own."""
    from sparsecore.ir import placement, uploads
    from sparsecore.ir.padding import unpadded
    mask = joint(160 * 64 - 10, 150)
    twice = mask.with_padding(mask.q_len + 100).with_padding(mask.q_len + 1835)
    assert unpadded(mask) is mask and unpadded(twice) == mask and block_class(twice) == "joint-64"
    on_device = twice.to("cpu")
    monkeypatch.setattr(placement, "run_device", lambda device: "elsewhere")      # copy_to's other device, on CPU
    monkeypatch.setattr(uploads, "moved", lambda tensor, device: tensor.clone())
    for copy in (on_device, on_device.to_host(), on_device.copy_to("elsewhere"), twice.select_heads([1])):
        assert block_class(copy) == "joint-64"
    assert unpadded(on_device).to_host() == mask
    assert unpadded(twice.select_heads([1])) == mask.select_heads([1])
    from sparsecore.integrations.diffusers.planner import Planner
    planned = Planner.padded_mask(None, on_device, on_device.q_len + 64)     # shares its facts with the mask's
    assert unpadded(planned).fingerprint() == mask.fingerprint() and block_class(planned) == "joint-64"


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


def causal_frames(frames: list[int], frame: int) -> BlockMask:
    """A frame-causal sequence of causal blocks of ``frames`` frames of ``frame`` tokens each, each cut into 64-token
    blocks, its last one short (``VideoGeometry(causal_frames=...)``), the diagonal kept."""
    offsets = BlockMask.uniform_offsets(frames[0] * frame, 64)
    for count in frames[1:]:
        offsets = np.concatenate([offsets, offsets[-1] + BlockMask.uniform_offsets(count * frame, 64)[1:]])
    return BlockMask.from_lists([[np.array([i]) for i in range(len(offsets) - 1)]], offsets, offsets)


@pytest.mark.parametrize("mask, block_class_", [
    (joint(100 * 64 - 10, 1305), "joint-64"),           # HunyuanVideo 1.5 with an image: 729 + 64 + 512 valid tokens
    (joint(200 * 64 - 10, 1400), "small"),              # more valid text than was measured
    (joint(200 * 64 - 10, 150).with_padding(200 * 64 - 10 + 1985), "joint-64"),   # its pipeline's slots, padded
    (joint(200 * 64 - 10, 1280).with_padding(200 * 64 - 10 + 1985), "joint-64"),  # valid text on the 64 grid
    (causal_frames([5, 1], 2040), "small"),             # SkyReels-V2 DF at 544x960, six frames: a last frame of 2,040
    (causal_frames([5, 1], 1000), "joint-64"),          # a last causal frame no longer than a joint mask's text
    (causal_frames([5, 5, 1], 1000), "small"),          # three causal blocks: a short block inside the "text"
    (causal_frames([5, 1, 1], 200), "small"),           # short blocks inside a "text" short enough to be one
])
def test_joint_class_bounds_the_valid_text(mask, block_class_):
    assert block_class(mask) == block_class_


@pytest.mark.parametrize("mask", [joint(160 * 64 - 10, 150), joint(40 * 64 - 10, 1400), causal_frames([5, 1], 2040),
                                  causal_frames([3, 3, 3], 500), BlockMask.full(2, 1000, 1000, 128),
                                  BlockMask.full(2, 4680, 4680, 1560)])
@pytest.mark.parametrize("padding", [1, 64, 1835])
def test_a_padded_mask_keeps_its_class(mask, padding):
    """No row lists a padding block, so the padding changes no kernel's work: a padded mask ranks as the mask."""
    assert block_class(mask.with_padding(mask.q_len + padding)) == block_class(mask)
