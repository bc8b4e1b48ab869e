"""LVSA planner: the paper's invariants as properties, the released code's published table, valid IR."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from oracle import expand_to_tokens

from sparsecore import BlockMask
from sparsecore.geometry import VideoGeometry
from sparsecore.methods import lvsa

patterns = st.fixed_dictionaries({
    "window": st.integers(0, 5),
    "first_frames": st.integers(0, 3),
    "reference_frames": st.integers(4, 40),
    "anchor_rule": st.sampled_from(["auto", "paper"]),
})


def pattern_of(frames: int, step: int, params: dict) -> lvsa.FramePattern:
    return lvsa.frame_pattern(VideoGeometry(frames, 1, 1), step, **params)


@given(st.integers(1, 130), st.integers(0, 400), patterns)
def test_every_query_frame_sees_the_same_number_of_frames(frames, step, params):
    assume(params["anchor_rule"] == "auto" or params["reference_frames"] > 2 * params["window"] + 1)
    pattern = pattern_of(frames, step, params)
    counts = pattern.attended().sum(axis=1)
    expected = len(pattern.anchors) + (min(2 * params["window"] + 1, frames - len(pattern.anchors))
                                       if params["window"] else 0)
    assert (counts == expected).all()


@given(st.integers(1, 130), st.integers(0, 400), patterns, st.booleans())
def test_windows_and_anchors_stay_inside_the_video(frames, step, params, expand):
    assume(params["anchor_rule"] == "auto" or params["reference_frames"] > 2 * params["window"] + 1)
    pattern = lvsa.frame_pattern(VideoGeometry(frames, 1, 1), step, expand_window=expand, **params)
    lo, hi = pattern.windows.T
    assert (lo >= 0).all() and (hi <= frames - 1).all()
    if not expand:                                           # the adaptive window keeps min(2W+1, T) frames
        assert ((hi - lo + 1) == (min(2 * params["window"] + 1, frames) if params["window"] else 0)).all()
    assert (np.diff(pattern.anchors) > 0).all() and 0 <= pattern.anchors.min() and pattern.anchors.max() < frames
    assert pattern.attended()[np.arange(frames), np.arange(frames)].all() or params["window"] == 0


@given(st.integers(1, 130), st.integers(0, 400), patterns)
def test_every_frame_is_an_anchor_within_any_interval_of_steps(frames, start, params):
    assume(params["anchor_rule"] == "auto" or params["reference_frames"] > 2 * params["window"] + 1)
    interval = pattern_of(frames, start, params).anchor_interval
    seen = np.zeros(frames, dtype=bool)
    sizes = set()
    for step in range(start, start + interval):
        anchors = pattern_of(frames, step, params).anchors
        seen[anchors] = True
        sizes.add(len(anchors))
    assert seen.all()
    assert len(sizes) == 1 or params["first_frames"] > 0     # rotation keeps |G| (leading frames may overlap)


@given(st.integers(1, 60), st.integers(0, 50), patterns, st.integers(0, 5))
def test_dense_when_the_video_fits_the_budget(frames, step, params, slack):
    assume(params["anchor_rule"] == "auto" or params["reference_frames"] > 2 * params["window"] + 1)
    params = {**params, "reference_frames": max(frames + slack, params["first_frames"] + 1,
                                                2 * params["window"] + 2)}
    mask = lvsa.plan(VideoGeometry(frames, 2, 3), 2, step=step, **params)
    assert mask.density() == 1.0 and mask.meta["dense"]


@given(st.integers(1, 40), st.integers(0, 30), st.integers(0, 12), st.sampled_from(["start", "end"]),
       st.integers(0, 3))
def test_ir_rows_are_the_frame_pattern_plus_dense_text(frames, step, text, position, window):
    g = VideoGeometry(frames, 2, 2, text_tokens=text, text_position=position)
    mask = lvsa.plan(g, 3, step=step, window=window, reference_frames=8)
    attended = lvsa.frame_pattern(g, step, window=window, reference_frames=8).attended()
    dense = mask.to_dense()
    assert (dense == dense[0]).all()                                     # one pattern for every head
    video = g.block_frames(mask.q_offsets) >= 0
    assert (dense[0][np.ix_(video, video)] == attended).all()
    assert dense[0][~video].all() and dense[0][:, ~video].all()          # text rows and text columns: dense
    assert mask.meta["method"] == "lvsa" and mask.meta["step"] == step and mask.meta["params"]["window"] == window


@given(st.integers(2, 30), st.integers(1, 4), st.integers(1, 5), st.integers(1, 40), st.integers(0, 5),
       st.integers(0, 9))
def test_retiled_mask_is_the_smallest_cover_of_the_frame_pattern(frames, height, width, block, text, step):
    g = VideoGeometry(frames, height, width, text_tokens=text)
    frame_mask = lvsa.plan(g, 1, step=step, reference_frames=6, window=1)
    tiled = lvsa.plan(g, 1, step=step, reference_frames=6, window=1, block_size=block)
    assert (np.diff(tiled.q_offsets) <= block).all()
    want, got = expand_to_tokens(frame_mask)[0], expand_to_tokens(tiled)[0]
    assert (got >= want).all()                                           # covers the frame pattern
    offsets = tiled.q_offsets
    for i in range(tiled.num_q_blocks):                                  # and every kept block pair is needed
        for j in tiled.row(0, i):
            assert want[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]].any()


def test_auto_rule_reproduces_the_released_sparsity_table():
    # LongVideoSparseAttention docs/tuning.md, Wan column (reference 21, W = 4 latents, 1 first frame)
    published = {21: 0.00, 33: 0.21, 41: 0.44, 49: 0.55, 65: 0.66, 81: 0.74, 121: 0.82}
    for frames, sparsity in published.items():
        pattern = lvsa.frame_pattern(VideoGeometry(frames, 1, 1), 0, window=4, reference_frames=21)
        assert 1 - pattern.attended().mean() == pytest.approx(sparsity, abs=0.006)


def test_anchor_intervals_of_both_rules_at_wan_6x():
    kwargs = dict(window=3, first_frames=1, reference_frames=21)
    assert lvsa.anchor_interval(121, rule="paper", **kwargs) == 121 // (21 - 7)
    auto = lvsa.anchor_interval(121, rule="auto", **kwargs)
    anchors = lvsa.anchors_at(121, auto, 0, first_frames=1)
    assert len(anchors) + 7 <= 21 + auto - 1                        # the realized budget is near C
    assert lvsa.anchor_interval(21, rule="auto", **kwargs) == 1     # T <= C: dense


def test_rotation_shifts_the_periodic_anchors_by_one_per_step():
    g = VideoGeometry(61, 1, 1)
    a0 = lvsa.frame_pattern(g, 0, first_frames=0).anchors
    a1 = lvsa.frame_pattern(g, 1, first_frames=0).anchors
    assert sorted(((a0 + 1) % 61).tolist()) == a1.tolist()
    fixed = lvsa.frame_pattern(g, 1, first_frames=0, rotate=False).anchors
    assert fixed.tolist() == a0.tolist()


def test_sequence_parallel_boundary_guards_are_anchors():
    g = VideoGeometry(40, 2, 2)
    pattern = lvsa.frame_pattern(g, 0, sp_world=4, window=2)
    for boundary in (10, 20, 30):
        assert set(range(boundary - 2, boundary + 3)) <= set(pattern.anchors.tolist())
    with pytest.raises(ValueError, match="split evenly"):
        lvsa.frame_pattern(VideoGeometry(3, 1, 1), 0, sp_world=2)


@pytest.mark.parametrize("geometry, heads, dense", [
    (VideoGeometry(21, 30, 52), 12, True),                        # Wan 2.1 1x: T = C, dense
    (VideoGeometry(121, 30, 52), 12, False),                      # Wan 2.1 6x
    (VideoGeometry(33, 30, 52, text_tokens=256), 16, True),       # HunyuanVideo 1.5 1x with text, C = 33
    (VideoGeometry(65, 30, 52, text_tokens=256), 16, False),      # HunyuanVideo 1.5 2x
])
def test_valid_ir_at_model_shapes(geometry, heads, dense):
    reference = 33 if geometry.text_tokens else 21
    mask = lvsa.plan(geometry, heads, step=7, layer=3, reference_frames=reference)
    assert mask.num_heads == heads and mask.q_len == geometry.tokens
    assert mask.meta["dense"] == dense and (mask.density() == 1.0) == dense
    video_rows = mask.row_lengths[:, :geometry.frames]
    assert (video_rows == video_rows[0, 0]).all()


def test_planning_121_frames_is_fast():
    g = VideoGeometry(121, 30, 52)
    lvsa.plan(g, 12, step=0)
    times = []
    for step in range(5):
        start = time.perf_counter()
        lvsa.plan(g, 12, step=step)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5                   # loose guard against blowups; bench/fidelity.py reports the time


def test_session_keeps_the_mask_of_the_current_anchors_only():
    """Every layer shares the step's mask and steps with the same anchors share it (docs/methods.md); an earlier
    rotation's mask is not kept (it could keep its device lists), so its anchors coming back build it again."""
    session = lvsa.session(num_steps=50)
    g = VideoGeometry(61, 2, 2)
    m0 = session.plan(g, 2, step=4, layer=0)
    assert session.plan(g, 2, step=4, layer=9) is m0
    assert session.plan(g, 2, step=5, layer=0) != m0
    again = session.plan(g, 2, step=4 + m0.meta["anchor_interval"], layer=0)
    assert again.meta["anchors"] == m0.meta["anchors"] and again is not m0 and again.fingerprint() == m0.fingerprint()
    fixed = lvsa.session(num_steps=50, rotate=False)
    assert fixed.plan(g, 2, step=4, layer=0) is fixed.plan(g, 2, step=30, layer=3)
    assert (m0.meta["step"], m0.meta["layer"], m0.meta["planned_at_step"]) == (None, None, 4)   # shared: no one step
    with pytest.raises(ValueError, match="step"):
        session.plan(g, 2, step=50)


def test_parameter_errors_name_the_field():
    g = VideoGeometry(30, 1, 1)
    with pytest.raises(TypeError, match="unknown parameter"):
        lvsa.plan(g, 1, step=0, windw=3)
    with pytest.raises(ValueError, match="anchor_rule"):
        lvsa.plan(g, 1, step=0, anchor_rule="sometimes")
    with pytest.raises(ValueError, match="C > 2W\\+1"):
        lvsa.plan(g, 1, step=0, anchor_rule="paper", reference_frames=7, window=3)
    with pytest.raises(TypeError, match="geometry"):
        lvsa.plan((30, 1, 1), 1, step=0)
    with pytest.raises(ValueError, match="step"):
        lvsa.plan(g, 1, step=-1)
    lvsa.plan(g, 1, step=1)
    lvsa.frame_pattern(g, 1)                                   # memoized for step 1: 1.0 and True hash alike
    for step in (1.0, True):
        with pytest.raises(TypeError, match="step: expected an int"):
            lvsa.plan(g, 1, step=step)
        with pytest.raises(TypeError, match="step: expected an int"):
            lvsa.frame_pattern(g, step)


def test_any_finite_sparsity_scale_plans():
    """A budget past every frame is dense, however far past (1e308 x C overflowed to inf, then int(inf))."""
    for scale in (1e308, 1e300, 2.0):
        assert lvsa.plan(VideoGeometry(30, 1, 1), 1, step=0, sparsity_scale=scale).meta["dense"]
    assert lvsa.session(num_steps=5, sparsity_scale=1e308).action(VideoGeometry(30, 1, 1), 0).dense


def test_methods_never_import_device_libraries():
    banned = {"triton", "flashinfer", "torch_npu"}
    root = Path(__file__).parent.parent / "sparsecore"
    for path in [*root.glob("methods/*.py"), root / "search.py", root / "geometry.py", root / "workloads.py",
                 root / "quality.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & banned, f"{path.name} imports a device library"


def test_a_session_gives_each_geometry_its_own_mask():
    """Two resolutions of one frame count share anchors at a step: each call still gets its own token layout."""
    session = lvsa.session(num_steps=50)
    small, large = VideoGeometry(40, 2, 3), VideoGeometry(40, 3, 4)
    for geometry in (small, large, small):
        mask = session.plan(geometry, 2, step=5, layer=0)
        assert mask.q_len == mask.kv_len == geometry.tokens
        assert (mask.q_offsets == geometry.block_offsets(None)).all()


def test_alternating_geometries_build_each_mask_once_a_rotation():
    """Guidance at two resolutions alternates geometries within a step: each keeps its mask (it was rebuilt at every
    call), and a new rotation still replaces it."""
    session = lvsa.session(num_steps=50)
    small, large = VideoGeometry(40, 2, 3), VideoGeometry(40, 3, 4)
    first = {g: session.plan(g, 2, step=5, layer=0) for g in (small, large)}
    for layer in range(1, 4):
        for g in (small, large):
            assert session.plan(g, 2, step=5, layer=layer) is first[g]
    rotated = session.plan(small, 2, step=6, layer=0)
    assert rotated.meta["anchors"] != first[small].meta["anchors"]
    assert session.plan(small, 2, step=6, layer=1) is rotated
    assert len(session._masks) == 2                       # one mask a geometry: the earlier rotation's is gone

def test_the_memoized_pattern_is_read_only():
    """The pattern is shared by every session of the process: one caller's edit made every later mask dense."""
    geometry = VideoGeometry(40, 4, 4)
    pattern = lvsa.frame_pattern(geometry, 3)
    for array in (pattern.anchors, pattern.windows):
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0


@pytest.mark.parametrize("num_heads, budgets", [(1, None), (5, None), (3, [0.25, 0.5, 1.0])])
def test_a_shared_mask_gives_every_head_the_map(num_heads, budgets):
    """selection.shared_mask builds one head's lists and copies them to the others without checking them again:
    each head's token mask is the map's, its budget the map's density or the one given, and the mask is valid."""
    from sparsecore.methods.selection import shared_mask
    rng = np.random.default_rng(num_heads)
    q_offsets, kv_offsets = np.array([0, 5, 12, 13, 30]), np.array([0, 7, 9, 20, 21, 26])
    block_map = rng.random((4, 5)) < 0.5
    block_map[1] = False                                              # an empty row
    mask = shared_mask(block_map, num_heads, q_offsets, kv_offsets, budgets=budgets, meta={"method": "test"})
    want = np.repeat(np.repeat(block_map, np.diff(q_offsets), axis=0), np.diff(kv_offsets), axis=1)
    assert (expand_to_tokens(mask) == want[None]).all() and mask.num_heads == num_heads
    expected_budgets = [block_map.mean()] * num_heads if budgets is None else budgets
    np.testing.assert_allclose(mask.budgets, expected_budgets)
    checked = BlockMask(num_heads, q_offsets, kv_offsets, mask.indptr, mask.indices, mask.budgets, mask.meta)
    assert checked == mask and not mask.indptr.flags.writeable and mask.meta["method"] == "test"
    with pytest.raises(ValueError, match="budgets"):
        shared_mask(block_map, 2, q_offsets, kv_offsets, budgets=[0.5, 1.5])


def _covering_block_map(geometry: VideoGeometry, pattern: lvsa.FramePattern, offsets: np.ndarray) -> np.ndarray:
    """The reference: bool ``[blocks, blocks]`` from the token map of the frame sets (video tokens see the frames
    their frame attends to, under causal frames only their own and earlier causal blocks; text sees and is seen by
    everything), a block pair kept when any of its token pairs is."""
    tokens = np.arange(geometry.tokens)
    frame = (tokens - geometry.video_start) // geometry.frame_tokens
    video = (tokens >= geometry.video_start) & (tokens < geometry.video_start + geometry.video_tokens)
    frame = np.where(video, frame, 0)
    token_map = pattern.attended()[np.ix_(frame, frame)] | ~video[:, None] | ~video[None, :]
    if geometry.causal_frames:
        group = frame // geometry.causal_frames
        token_map &= group[None, :] <= group[:, None]
    rows = np.logical_or.reduceat(token_map, offsets[:-1], axis=0)
    return np.logical_or.reduceat(rows, offsets[:-1], axis=1)


@pytest.mark.parametrize("geometry, block_size, params", [
    (VideoGeometry(37, 3, 5), 64, {}),                                               # 555 tokens: a short last block
    (VideoGeometry(37, 3, 5), 7, {"window": 1, "reference_frames": 8}),
    (VideoGeometry(29, 7, 3, text_tokens=45), 64, {"reference_frames": 9}),          # text at the end
    (VideoGeometry(29, 7, 3, text_tokens=45), 5, {"window": 0, "first_frames": 0, "reference_frames": 6}),
    (VideoGeometry(23, 2, 9, text_tokens=300, text_position="start"), 16, {"reference_frames": 7}),
    (VideoGeometry(31, 2, 3), 100, {"window": 2, "reference_frames": 8}),            # a block spans several frames
    (VideoGeometry(50, 5, 5, causal_frames=4), 64, {"reference_frames": 10}),         # blocks restart per causal block
    (VideoGeometry(41, 3, 3, text_tokens=20, text_position="start"), None, {"reference_frames": 8}),   # frame blocks
    (VideoGeometry(40, 4, 2), 13, {"sp_world": 4, "window": 1, "reference_frames": 12}),   # boundary guards
])
@pytest.mark.parametrize("step", [0, 1, 2, 5, 13])
def test_mask_lists_are_the_token_map_of_the_frame_sets(geometry, block_size, params, step):
    """The lists (built from runs of blocks, never a dense block map) are exactly those of the block map taken from
    the token map of the frame sets LVSA reports, in every head; offsets, budgets and meta as the IR would give."""
    heads = 3
    mask = lvsa.plan(geometry, heads, step=step, layer=4, block_size=block_size, **params)
    pattern = lvsa.frame_pattern(geometry, step, block_size=block_size, **params)
    offsets = geometry.block_offsets(block_size)
    want = _covering_block_map(geometry, pattern, offsets)
    assert np.array_equal(mask.q_offsets, offsets) and np.array_equal(mask.kv_offsets, offsets)
    assert np.array_equal(mask.indptr, (np.arange(heads)[:, None] * want.sum() + np.concatenate(
        [[0], np.cumsum(want.sum(axis=1))])[None, :]).astype(np.int32))
    assert np.array_equal(mask.indices, np.tile(np.nonzero(want)[1], heads).astype(np.int32))
    assert mask.indptr.dtype == np.int32 and mask.indices.dtype == np.int32 and not mask.indices.flags.writeable
    assert np.array_equal(mask.budgets, np.full(heads, want.mean()))
    assert list(mask.meta["anchors"]) == pattern.anchors.tolist() and mask.meta["step"] == step
    assert mask.meta["layer"] == 4 and mask.meta["dense"] == pattern.dense
    assert BlockMask(heads, offsets, offsets, mask.indptr, mask.indices, mask.budgets, mask.meta) == mask   # valid


def test_wan_6x_mask_in_64_token_blocks_is_the_cover_of_the_frame_sets():
    """At Wan 2.1 6x (2,950 blocks of 64 tokens; no token map): block i's frames are those its tokens lie in, and
    block pair (i, j) is kept when a frame of i attends to a frame of j, at consecutive steps of the rotation."""
    g = VideoGeometry(121, 30, 52)
    offsets = g.block_offsets(64)
    touches = np.zeros((len(offsets) - 1, g.frames), dtype=np.float32)             # block i has a token of frame t
    touches[np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)), np.arange(g.tokens) // g.frame_tokens] = 1
    session = lvsa.session(50, block_size=64)
    for step in (3, 4):
        attended = lvsa.frame_pattern(g, step, block_size=64).attended().astype(np.float32)
        want = touches @ attended @ touches.T > 0
        mask = session.plan(g, 2, step=step)
        assert np.array_equal(mask.indptr[0], np.concatenate([[0], np.cumsum(want.sum(axis=1))]))
        assert np.array_equal(mask.indices, np.tile(np.nonzero(want)[1], 2))
