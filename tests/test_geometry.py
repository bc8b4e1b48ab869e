"""VideoGeometry: token layout, block offsets and token <-> (t, y, x) maps, against hand-built layouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsecore import BlockMask
from sparsecore.geometry import VideoGeometry

geometries = st.builds(VideoGeometry, st.integers(1, 9), st.integers(1, 7), st.integers(1, 7),
                       st.integers(0, 40), st.sampled_from(["start", "end"]))


def test_sizes_and_slices():
    g = VideoGeometry(3, 2, 5, text_tokens=7)
    assert (g.frame_tokens, g.video_tokens, g.tokens) == (10, 30, 37)
    assert g.video_slice == slice(0, 30) and g.text_slice == slice(30, 37)
    s = VideoGeometry(3, 2, 5, text_tokens=7, text_position="start")
    assert s.video_slice == slice(7, 37) and s.text_slice == slice(0, 7)
    assert "3x2x5 + 7 text (end) = 37 tokens" == str(g)


def test_frame_blocks_with_text_at_either_end():
    g = VideoGeometry(3, 2, 2, text_tokens=6)                 # P = 4: text cut into blocks of <= 4
    assert g.frame_offsets().tolist() == [0, 4, 8, 12]
    assert g.block_offsets().tolist() == [0, 4, 8, 12, 16, 18]
    assert g.block_frames(g.block_offsets()).tolist() == [0, 1, 2, -1, -1]
    assert g.text_blocks(g.block_offsets()).tolist() == [False, False, False, True, True]
    s = VideoGeometry(3, 2, 2, text_tokens=6, text_position="start")
    assert s.block_offsets().tolist() == [0, 4, 6, 10, 14, 18]
    assert s.block_frames(s.block_offsets()).tolist() == [-1, -1, 0, 1, 2]


def test_fixed_blocks_split_at_the_modality_boundary_unless_asked():
    g = VideoGeometry(3, 2, 5, text_tokens=7)                 # 30 video + 7 text
    assert g.block_offsets(8).tolist() == [0, 8, 16, 24, 30, 37]
    assert g.block_offsets(8, text_block=4).tolist() == [0, 8, 16, 24, 30, 34, 37]
    assert g.block_offsets(8, split_text=False).tolist() == BlockMask.uniform_offsets(37, 8).tolist()
    assert g.text_blocks(g.block_offsets(8, split_text=False)).tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="split_text=False needs a fixed block size"):
        g.block_offsets(None, split_text=False)


def test_a_text_block_size_the_blocks_would_ignore_is_refused():
    """text_block was ignored silently under split_text=False (uniform blocks over text and video) and unchecked
    without text (-1 accepted)."""
    g = VideoGeometry(3, 2, 5, text_tokens=7)
    with pytest.raises(ValueError, match="text_block: split_text=False cuts the whole sequence into 8-token blocks"):
        g.block_offsets(8, split_text=False, text_block=4)
    with pytest.raises(ValueError, match="text_block: expected an int >= 1, got -1"):
        VideoGeometry(3, 2, 5).block_offsets(8, text_block=-1)
    assert VideoGeometry(3, 2, 5).block_offsets(8, text_block=4).tolist() == [0, 8, 16, 24, 30]   # no text: no block


@given(geometries, st.one_of(st.none(), st.integers(1, 50)))
def test_block_offsets_are_valid_ir_offsets_that_respect_modalities(g, block):
    offsets = g.block_offsets(block)
    mask = BlockMask.from_lists([[[0]] * (len(offsets) - 1)], offsets, offsets)
    assert mask.q_len == g.tokens
    text = g.text_blocks(offsets)
    for i in range(len(offsets) - 1):                         # no block mixes video and text
        kinds = set(g.is_text(np.arange(offsets[i], offsets[i + 1])).tolist())
        assert kinds == {bool(text[i])}
    if block is None:
        assert (np.diff(offsets)[~text] == g.frame_tokens).all()
    else:
        assert (np.diff(offsets) <= block).all()


@pytest.mark.parametrize("text_position", ["end", "start"])
def test_frames_are_laid_out_row_major_like_diffusers_patchify(text_position):
    """diffusers flattens a latent ``(F, H, W)`` row-major: x fastest, then y, then t, the text before or after."""
    g = VideoGeometry(2, 3, 4, text_tokens=5, text_position=text_position)
    start = 5 if text_position == "start" else 0
    t, y, x = (a.ravel() for a in np.indices((2, 3, 4)))     # row-major: Wan's hidden_states.flatten(2)
    tokens = start + np.arange(24)
    assert (g.token(t, y, x) == tokens).all()
    assert all((got == want).all() for got, want in zip(g.position(tokens), (t, y, x)))
    assert (g.video_positions() == np.stack([t, y, x], axis=1)).all()
    assert [int(a) for a in g.position(start + 6)] == [0, 1, 2] and g.token(1, 2, 1) == start + 12 + 8 + 1
    text = np.arange(24, 29) if text_position == "end" else np.arange(5)
    assert all((a == -1).all() for a in g.position(text))


@given(geometries)
def test_token_position_round_trip(g):
    tokens = np.arange(g.tokens)
    t, y, x = g.position(tokens)
    video = ~g.is_text(tokens)
    assert video.sum() == g.video_tokens
    assert (g.token(t[video], y[video], x[video]) == tokens[video]).all()
    assert (t[~video] == -1).all() and (g.frame_of(tokens)[~video] == -1).all()
    assert (g.frame_of(tokens)[video] == t[video]).all()
    local, frame = tokens[video] - g.video_start, g.height * g.width      # row-major within each frame
    assert (t[video] == local // frame).all() and (y[video] == local % frame // g.width).all()
    assert (x[video] == local % g.width).all()
    positions = g.video_positions()
    assert (g.token(*positions.T) == tokens[video]).all()      # frame-major, then row-major
    if g.video_tokens > 1:
        assert (np.diff(g.token(*positions.T)) == 1).all()


def test_invalid_input_names_the_field():
    with pytest.raises(ValueError, match="text_position"):
        VideoGeometry(2, 2, 2, text_position="middle")
    with pytest.raises(ValueError, match="frames: expected an int >= 1, got 0"):
        VideoGeometry(0, 2, 2)
    with pytest.raises(TypeError, match="height: expected an int"):
        VideoGeometry(2, True, 2)
    with pytest.raises(ValueError, match="tokens: expected indices in"):
        VideoGeometry(2, 2, 2).position(8)
    with pytest.raises(ValueError, match="y: expected values in"):
        VideoGeometry(2, 2, 2).token(0, 2, 0)
    for t, y, x, name in ((1.9, 0, 0, "t"), (0, True, 0, "y"), (0, 0, np.array([0.5]), "x")):   # not truncated
        with pytest.raises(TypeError, match=f"{name}: expected integer coordinates"):
            VideoGeometry(2, 2, 2).token(t, y, x)
