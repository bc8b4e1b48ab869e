"""Radial Attention (``sparsecore.methods.radial``): its block maps against the rule stated token by token here (each
frame pair's token mask, cut into blocks one block at a time), its text and short-block rules, its refusals, its
session's dense steps and layers, and a Wan model run to the float64 oracle under its masks (CPU).

That the rule stated here is the released code's is checked against the released function itself by
``bench/radial_released_check.py`` (it needs the released repository)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_integration_diffusers import CASES, forward, full_mask, oracle_output

from sparsecore import VideoGeometry
from sparsecore.integrations import diffusers as sparse
from sparsecore.methods import radial


def frame_pair_tokens(i: int, j: int, tokens: int, decay: float, block: int, sink: bool) -> np.ndarray:
    """The token mask ``[T, T]`` of query frame ``i`` against key frame ``j``."""
    d = abs(i - j)
    if sink and j == 0:
        return np.ones((tokens, tokens), dtype=bool)
    reach = 2.0 ** tokens.bit_length() / 2.0 ** d.bit_length()       # halves each time the distance doubles
    if reach < 128 and d % int(128 / reach) != 0:
        return np.zeros((tokens, tokens), dtype=bool)
    band = tokens if d <= 1 else max(reach * decay, block)
    r, c = np.indices((tokens, tokens))
    return np.abs(c - r) <= band


def expected_video_map(geometry: VideoGeometry, decay: float, block: int, sink: bool) -> np.ndarray:
    """The rule token by token: each pair's mask placed at its frames' first tokens' places in their blocks, on a grid
    of ``ceil(T / block)`` blocks each way; a block is kept where more than 60% of its columns with any row set have
    more than a third of its rows set; pairs joined; a short last block sees and is seen by all."""
    frames, tokens = geometry.frames, geometry.frame_tokens
    total = -(-geometry.video_tokens // block)
    nb = -(-tokens // block)
    out = np.zeros((total, total), dtype=bool)
    for i in range(frames):
        for j in range(frames):
            grid = np.zeros((nb * block + block, nb * block + block), dtype=bool)
            ri, rj = i * tokens % block, j * tokens % block
            grid[ri:ri + tokens, rj:rj + tokens] = frame_pair_tokens(i, j, tokens, decay, block, sink)
            for a in range(nb):
                for b in range(nb):
                    cell = grid[a * block:(a + 1) * block, b * block:(b + 1) * block]
                    counts = cell.sum(axis=0)
                    high, nonempty = (counts / block > 1 / 3).sum(), (counts > 0).sum()
                    if nonempty and high / nonempty > 0.6:
                        out[i * tokens // block + a, j * tokens // block + b] = True
    if geometry.video_tokens % block:
        out[-1, :] = out[:, -1] = True
    return out


def rule_leaves_rows_empty(geometry: VideoGeometry, decay: float, block: int, sink: bool) -> bool:
    """Whether the frame pairs keep no block in some row (the short last block's forced row and column aside)."""
    rows = expected_video_map(geometry, decay, block, sink)
    if geometry.video_tokens % block:
        rows = rows[:-1, :-1]
    return not rows.any(axis=1).all()


def block_map(mask) -> np.ndarray:
    """bool ``[H, MB, NB]`` from a host mask's lists."""
    indptr, indices = np.asarray(mask.indptr), np.asarray(mask.indices)
    out = np.zeros((indptr.shape[0], indptr.shape[1] - 1, len(mask.kv_offsets) - 1), dtype=bool)
    for h in range(out.shape[0]):
        for row in range(out.shape[1]):
            out[h, row, indices[indptr[h, row]:indptr[h, row + 1]]] = True
    return out


@settings(max_examples=150, deadline=None)
@given(frames=st.integers(1, 12), height=st.integers(2, 12), width=st.integers(2, 16),
       decay=st.sampled_from([0.2, 0.3, 0.5, 0.7, 0.95, 1.0, 1.3, 3.0]),
       block=st.sampled_from([16, 32, 48, 64, 96, 128]), sink=st.booleans())
def test_block_maps_follow_the_rule_token_by_token(frames, height, width, decay, block, sink):
    geometry = VideoGeometry(frames, height, width)
    want = expected_video_map(geometry, decay, block, sink)
    params = radial.RadialParams(decay_factor=decay, block_size=block, sink=sink)
    if rule_leaves_rows_empty(geometry, decay, block, sink):
        with pytest.raises(ValueError, match="keeps no frame block"):
            radial.video_block_map(geometry, params)
    else:
        assert np.array_equal(radial.video_block_map(geometry, params), want)


@pytest.mark.parametrize("frames, height, width, decay, sink, block", [
    (16, 8, 12, 1.0, True, 128), (9, 15, 26, 0.2, True, 128), (6, 30, 20, 0.5, False, 128),
    (20, 10, 20, 0.2, False, 128), (14, 18, 47, 1.3, False, 32), (12, 11, 51, 0.7, True, 64),
    (9, 30, 52, 0.3, True, 128), (9, 17, 27, 0.7, True, 128), (11, 6, 27, 0.7, False, 64)])
def test_realistic_frames_follow_the_rule(frames, height, width, decay, sink, block):
    """Frames of hundreds to 1,560 tokens, where the band's width (not a round number of tokens) and the split rule
    both cut."""
    geometry = VideoGeometry(frames, height, width)
    got = radial.video_block_map(geometry, radial.RadialParams(decay_factor=decay, sink=sink, block_size=block))
    want = expected_video_map(geometry, decay, block, sink)
    assert np.array_equal(got, want) and 0 < got.mean() < 1


@pytest.mark.parametrize("position", ["end", "start"])
def test_text_blocks_see_and_are_seen_by_everything(position):
    video = VideoGeometry(9, 15, 26)
    joint = VideoGeometry(9, 15, 26, text_tokens=200, text_position=position)
    mask = radial.plan(joint, 3)
    got = block_map(mask)
    text = joint.text_blocks(mask.q_offsets)
    assert text.sum() == 2 and (got[:, text].all() and got[:, :, text].all())
    assert np.array_equal(got[0][np.ix_(~text, ~text)], radial.video_block_map(video, radial.RadialParams()))
    video_offsets = video.block_offsets(128)
    count = len(video_offsets)
    got_offsets = mask.q_offsets[:count] if position == "end" else mask.q_offsets[-count:] - 200
    assert np.array_equal(got_offsets, video_offsets)


def test_every_head_step_and_layer_get_one_mask_object():
    session = radial.session(4, decay_factor=0.5)
    geometry = VideoGeometry(12, 10, 20)
    first = session.plan(geometry, 4, step=1, layer=3)
    assert session.plan(geometry, 4, step=3, layer=0) is first
    assert first.meta["layer"] is None and first.meta["step"] is None and first.meta["method"] == "radial"
    got = block_map(first)
    assert (got == got[0]).all() and np.array_equal(got[0], expected_video_map(geometry, 0.5, 128, False))


def test_alternating_geometries_build_each_mask_once(monkeypatch):
    """A session kept one mask: a pipeline alternating two geometries (guidance at two resolutions, a planner shared
    by two pipelines) rebuilt it at every call. Each (geometry, heads) is built once while among the MASKS_KEPT."""
    built = []
    share = radial.shared_mask
    monkeypatch.setattr(radial, "shared_mask", lambda block_map, heads, *args, meta: built.append(
        (meta["geometry"], heads)) or share(block_map, heads, *args, meta=meta))
    session = radial.session(4)
    small, large = VideoGeometry(12, 10, 20), VideoGeometry(8, 16, 16)
    masks = {}
    for step in range(4):
        for layer in range(3):
            for geometry in (small, large):
                mask = session.plan(geometry, 2, step=step, layer=layer)
                assert masks.setdefault(geometry, mask) is mask          # the same object: not rebuilt
    assert built == [(radial.geometry_meta(small), 2), (radial.geometry_meta(large), 2)]
    for geometry, mask in masks.items():
        assert np.array_equal(block_map(mask)[1], expected_video_map(geometry, 1.0, 128, False))
    others = [VideoGeometry(frames, 10, 20) for frames in range(2 * radial.MASKS_KEPT, 3 * radial.MASKS_KEPT + 3)]
    for geometry in others:                               # a stream of resolutions: the session keeps the last few
        session.plan(geometry, 1, step=0)
    assert list(session._masks) == [(geometry, 1) for geometry in others[-radial.MASKS_KEPT:]]


def test_dense_steps_and_layers_and_full_patterns_are_dense_actions():
    session = radial.session(5, dense_steps=2, dense_layers=1)
    geometry = VideoGeometry(12, 10, 20)
    assert [session.action(geometry, step, 1).dense for step in range(5)] == [True, True, False, False, False]
    assert session.action(geometry, 3, 0).dense and not session.action(geometry, 3, None).dense
    assert session.action(geometry, 3, 2).shared and session.action(geometry, 3, 2).plans
    assert session.action(VideoGeometry(2, 10, 20), 3, 2).dense       # two frames: every pair adjacent


def test_plan_is_dense_at_the_dense_steps_and_layers_as_the_sessions_action_says():
    """radial.plan took dense_steps and dense_layers and returned the radial mask where its session says dense."""
    geometry, params = VideoGeometry(8, 8, 16), dict(dense_steps=12, dense_layers=1, block_size=32)
    session = radial.session(50, **params)
    for step, layer in ((3, 2), (30, 0)):
        assert session.action(geometry, step, layer).dense
        mask = radial.plan(geometry, 2, step=step, layer=layer, **params)
        assert mask.density() == 1.0 and mask.num_heads == 2 and mask.meta["action"] == "dense"
    assert radial.plan(geometry, 2, step=12, layer=1, **params).density() < 1
    with pytest.raises(ValueError, match="block_size: expected at most the 1024 video tokens"):  # refused, dense or not
        radial.plan(geometry, 2, step=3, layer=0, **{**params, "block_size": 4096})


def test_dense_steps_that_leave_no_sparse_step_are_refused_naming_the_remedy():
    """``dense_steps >= num_steps`` made every step dense without a word: Radial Attention never ran. Refused, as
    AdaSpa's ``warmup_steps`` and the integration's Radial ``dense_layers`` are; a one-off plan() at a dense step of a
    longer run is still the dense mask."""
    for steps, dense in ((4, 4), (4, 5), (1, 10 ** 30)):
        with pytest.raises(ValueError, match=f"dense_steps: expected fewer than num_steps={steps} .*; pass"):
            radial.session(steps, dense_steps=dense)
    assert not radial.session(4, dense_steps=3).action(VideoGeometry(8, 8, 16), 3).dense
    assert radial.plan(VideoGeometry(8, 8, 16), 2, step=0, dense_steps=10 ** 30).meta["action"] == "dense"


@pytest.mark.parametrize("params, error, match", [
    ({"decay_factor": 0}, ValueError, "decay_factor"), ({"decay_factor": "1"}, TypeError, "decay_factor"),
    ({"sink": 1}, TypeError, "sink"), ({"dense_steps": -1}, ValueError, "dense_steps"),
    ({"block_size": 0}, ValueError, "block_size"), ({"window": 3}, TypeError, "unknown parameter")])
def test_bad_parameters_raise_naming_the_field(params, error, match):
    with pytest.raises(error, match=match):
        radial.session(4, **params)


def test_rows_the_rule_leaves_empty_and_causal_frames_are_refused_naming_a_remedy():
    with pytest.raises(ValueError, match="block_size, at most 42"):
        radial.plan(VideoGeometry(48, 6, 7), 2)
    session = radial.session(50, dense_steps=12, dense_layers=1)
    for geometry in (VideoGeometry(48, 6, 7), VideoGeometry(4, 8, 8, causal_frames=1)):   # at a dense step too
        with pytest.raises(ValueError, match="block_size|causal"):
            session.action(geometry, 0, 0)
    with pytest.raises(ValueError, match="block_size: expected at most the 512 video tokens"):
        radial.plan(VideoGeometry(8, 8, 8), 2, block_size=10**8)
    with pytest.raises(ValueError, match="step"):
        radial.plan(VideoGeometry(8, 8, 8), 2, step=-1)
    assert radial.session(4, decay_factor=1e306).action(VideoGeometry(4, 64, 64), 1, 1).dense   # every band full
    assert radial.plan(VideoGeometry(48, 6, 7), 2, block_size=32).density() < 0.1
    with pytest.raises(ValueError, match="causal"):
        radial.plan(VideoGeometry(4, 8, 8, causal_frames=1), 2)


def test_wan_runs_to_the_float64_oracle_under_radial_masks(monkeypatch):
    """A tiny Wan (8 frames of 64 tokens, 16-token blocks): apply() turns the sink on for Wan, layer 0 stays dense,
    layer 1 runs the mask, and the output is float64 attention under those masks."""
    case = CASES["wan"]
    model, inputs = case.build(), case.inputs(batch=2)
    params = {"block_size": 16, "dense_layers": 1, "decay_factor": 0.5}
    reference = radial.session(1, sink=True, **params)

    def provider(geometry, num_heads, step, layer):
        if reference.action(geometry, step, layer).dense:
            return full_mask(geometry, num_heads, step, layer)
        return reference.plan(geometry, num_heads, step=step, layer=layer)

    expected, _ = oracle_output(case, model, inputs, provider, 0, 500.0, monkeypatch)
    dense = forward(model, inputs, 500.0)
    handle = sparse.apply(model, "radial", device="cpu", num_steps=1, **params)
    try:
        got = forward(model, inputs, 500.0)
    finally:
        handle.remove()
    assert handle._planner.session(handle.geometry).params.sink
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=5e-6)
    assert (got - dense).abs().max() > 5e-3
    assert [(s["layer"], s["backend"] == "dense") for s in handle.stats()] == [(0, True), (1, False)]
